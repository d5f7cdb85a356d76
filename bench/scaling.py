"""Scaling from one GPU to N on one host: data parallelism, FSDP, and (for MoE presets) expert
parallelism against replicated experts.

Each mode is a separate `bench/train_throughput.py` process, so that each sees only its own GPUs
(CUDA_VISIBLE_DEVICES) and its memory figures are its own. The baseline is the same preset on
one GPU, measured in the same run, at the per-GPU batch every mode keeps (weak scaling: N GPUs
process N times the tokens per step).

    python bench/scaling.py --preset 350m --gpus 2 --batch-per-gpu 32
    python bench/scaling.py --preset moe_8x350m --gpus 2 --batch-per-gpu 16 --modes dp,ep
    python bench/scaling.py --modes dp --profile /tmp/trace \
        --xla-flags ';--xla_gpu_all_reduce_combine_threshold_bytes=8388608'

Scaling = tokens/s with N GPUs / tokens/s with one GPU; ideal is N. With --profile, each
mode's trace lands in DIR/<mode tag>; `python bench/trace_summary.py DIR/<tag>` then says how
much of the step is communication and how much of it compute hides.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# mode -> mesh overrides for n GPUs
MODES = {
    "dp": lambda n: [f"parallel.data={n}"],
    "fsdp": lambda n: ["parallel.data=1", f"parallel.fsdp={n}"],
    "ep": lambda n: ["parallel.data=1", f"parallel.expert={n}"],
    "dp+ep": lambda n: ["parallel.data=-1", f"parallel.expert={n}"],
}


def run_mode(preset: str, gpus: int, batch: int, args: argparse.Namespace,
             overrides: list[str], xla_flags: str = "", profile: str = "") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        command = [sys.executable, str(ROOT / "bench/train_throughput.py"), "--presets", preset,
                   "--batch", str(batch), "--seq-len", str(args.seq_len),
                   "--steps", str(args.steps), "--json", str(out),
                   *(["--profile", profile] if profile else []), *overrides, *args.overrides]
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, range(gpus))),
               "PYTHONUNBUFFERED": "1"}
        if xla_flags:
            env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {xla_flags}".strip()
        print(f"[{gpus} GPU] {'XLA_FLAGS=' + repr(xla_flags) + ' ' if xla_flags else ''}"
              f"{' '.join(command[2:])}", flush=True)
        subprocess.run(command, check=True, cwd=ROOT, env=env)
        return json.loads(out.read_text())[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="350m")
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--batch-per-gpu", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--modes", default="dp,fsdp", help=f"comma-separated of {list(MODES)}")
    parser.add_argument("--xla-flags", default="",
                        help="';'-separated XLA flag sets: every multi-GPU mode runs once per "
                             "set (e.g. '--xla_gpu_all_reduce_combine_threshold_bytes=8388608')")
    parser.add_argument("--profile", default="",
                        help="trace each multi-GPU run into DIR/<mode>[-<flag set #>]")
    parser.add_argument("overrides", nargs="*", help="config overrides for every mode")
    args = parser.parse_args()
    unknown = [m for m in args.modes.split(",") if m not in MODES]
    if unknown:
        parser.error(f"--modes: unknown {unknown}; choose from {list(MODES)}")

    rows = [("1 GPU", run_mode(args.preset, 1, args.batch_per_gpu, args, []))]
    flag_sets = args.xla_flags.split(";") if args.xla_flags else [""]
    for mode in args.modes.split(","):
        for i, flags in enumerate(flag_sets):
            name = f"{mode} x{args.gpus}" + (f" [{flags}]" if flags else "")
            tag = mode + (f"-{i}" if len(flag_sets) > 1 else "")
            rows.append((name, run_mode(args.preset, args.gpus, args.batch_per_gpu * args.gpus,
                                        args, MODES[mode](args.gpus), flags,
                                        str(Path(args.profile) / tag) if args.profile else "")))
    base = rows[0][1]["tokens_per_s"]
    print(f"\n{args.preset}, seq {args.seq_len}, {args.batch_per_gpu} sequences per GPU")
    print("| mode | GPUs | global batch | step ms | tokens/s | scaling vs 1 GPU | "
          "TFLOP/s per GPU | step GiB per GPU |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['devices']} | {r['batch']} | {r['step_ms']:.1f} | "
              f"{r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base:.3f}x | {r['tflops']:.0f} | "
              f"{r['step_gib']:.1f} |")


if __name__ == "__main__":
    main()
