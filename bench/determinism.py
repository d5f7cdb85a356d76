"""Deterministic mode on one GPU: bit-identical re-runs, kill-and-resume, and the cost.

For one model preset, through the real CLI (`spjax train`, one process per run):

  default         train.deterministic=false, the baseline of the tokens/s ratio
  default again   (--repeat-default) the same: shows whether default runs differ
  deterministic   train.deterministic=true, twice: the loss curves must be bit-identical
  killed+resumed  (--kill-at K) deterministic, SIGKILLed after its checkpoint at step K, then
                  resumed to the end: must equal the straight run loss for loss

    python bench/determinism.py --preset 60m --steps 60 --kill-at 30 --repeat-default
    python bench/determinism.py --preset 350m --steps 40 --batch 32 --cost-only model.d_ff=2816

Tokens/s is summary.json's median over logging intervals (10 steps each). Each run uses the
persistent compile cache as a user's run would (`train.compile_cache` default): the second
run of a configuration loads the first one's executable.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def command(args: argparse.Namespace, run_dir: Path, deterministic: bool,
            checkpoint_every: int = 0) -> list[str]:
    return [sys.executable, "-m", "spjax.cli", "train", "configs/tiny.yaml",
            f"model={args.preset}", "model.vocab_size=0", f"data.seq_len={args.seq_len}",
            f"data.batch_size={args.batch}", f"train.steps={args.steps}", "train.log_every=1",
            "train.eval_every=0", "train.eval_batches=2", "train.progress=false",
            f"train.checkpoint_every={checkpoint_every}", f"train.deterministic={deterministic}",
            f"run_dir={run_dir}", *args.overrides]


def run(cmd: list[str], log: Path) -> None:
    with log.open("a") as out:
        code = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"run failed ({code}); see {log}:\n{log.read_text()[-3000:]}")


def killed_and_resumed(args: argparse.Namespace, run_dir: Path, log: Path) -> None:
    """Deterministic run SIGKILLed once its checkpoint at --kill-at is complete, resumed."""
    cmd = command(args, run_dir, True, checkpoint_every=args.kill_at)
    with log.open("a") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        saved = run_dir / "checkpoints" / str(args.kill_at)
        while not saved.is_dir():  # orbax renames the step directory once it is complete
            if proc.poll() is not None:
                raise SystemExit(f"run ended before step {args.kill_at}; see {log}")
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    run(cmd, log)


def losses(run_dir: Path) -> dict[int, float]:
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def first_difference(a: dict[int, float], b: dict[int, float]) -> str:
    differing = [s for s in sorted(a) if a[s] != b.get(s)]
    if not differing and a.keys() == b.keys():
        return "bit-identical"
    if not differing:
        return f"steps differ: {sorted(a.keys() ^ b.keys())[:5]}"
    gap = max(abs(a[s] - b[s]) for s in differing if s in b)
    return f"differ from step {differing[0]} (max |d loss| {gap:.3g})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="60m")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--kill-at", type=int, default=0, help="0: no kill-and-resume run")
    parser.add_argument("--repeat-default", action="store_true")
    parser.add_argument("--cost-only", action="store_true",
                        help="one default and one deterministic run: the tokens/s ratio only")
    parser.add_argument("--out", default="", help="run directories and logs here (kept)")
    parser.add_argument("--json", default="", help="also write the table to this file")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.kill_at and not 0 < args.kill_at < args.steps:
        parser.error("--kill-at must lie between 0 and --steps")

    out = Path(args.out or tempfile.mkdtemp(prefix="spjax-determinism-"))
    out.mkdir(parents=True, exist_ok=True)
    log = out / "runs.log"
    plan = [("default", False), ("deterministic", True), ("deterministic again", True)]
    if args.repeat_default:
        plan.insert(1, ("default again", False))
    if args.cost_only:
        plan = plan[:2] if not args.repeat_default else [plan[0], plan[2]]
    summaries = {}
    for name, deterministic in plan:
        run_dir = out / name.replace(" ", "_")
        run(command(args, run_dir, deterministic), log)
        summaries[name] = (run_dir, json.loads((run_dir / "summary.json").read_text()))
    if args.kill_at:
        run_dir = out / "killed_and_resumed"
        killed_and_resumed(args, run_dir, log)
        summaries["killed+resumed"] = (run_dir, json.loads((run_dir / "summary.json").read_text()))

    base_dir, base = summaries["default"]
    det_dir = summaries["deterministic"][0]
    rows = []
    for name, (run_dir, summary) in summaries.items():
        reference = base_dir if name.startswith("default") else det_dir
        rows.append({"run": name, "tokens_per_s": summary["tokens_per_s"],
                     "vs_default": summary["tokens_per_s"] / base["tokens_per_s"],
                     "compile_s": summary["compile_time_s"],
                     "final_loss": summary["final_train_loss"],
                     "loss_curve": "reference" if run_dir in (base_dir, det_dir)
                     else first_difference(losses(reference), losses(run_dir))})
    print(f"\n{args.preset}, {args.steps} steps of {args.batch} x {args.seq_len} tokens "
          f"({' '.join(args.overrides) or 'no overrides'}), device "
          f"{base['device_kind']}:")
    print("| run | tokens/s | vs default | compile s | final loss | loss curve |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['tokens_per_s']:,.0f} | {r['vs_default']:.3f}x | "
              f"{r['compile_s']:.1f} | {r['final_loss']:.6f} | {r['loss_curve']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
