"""Dense vs sliding-window + global vs learned-gate (SeerAttention-style) attention at equal
steps: final validation loss, attention FLOPs actually computed vs dense, and tokens/s.

Each variant is a real `spjax train` run (subprocess) in RUN_ROOT/<name>; re-running skips
runs whose summary.json exists. Without --data the runs use the built-in default data.

    python bench/attention_compare.py --model tiny --seq-len 512 --batch 8 --steps 300 \\
        --block 32 --window 128 --global-tokens 32 --run-root runs/attention_tiny
    python bench/attention_compare.py --model 60m --seq-len 8192 --batch 8 --steps 400 \\
        --block 128 --window 1024 --global-tokens 128 --run-root runs/attention8k \\
        model.vocab_size=0 model.compute_dtype=bfloat16 optimizer.lr=1e-3

(400 x 8 x 8192 = 26M tokens stays within one epoch of the built-in data; more steps repeat
it, and the sweep's 4-epoch runs overfit, docs/SWEEPS.md.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _launch import plot_metric, spjax_train  # bench/ is the script's directory, so on sys.path


def variants(args: argparse.Namespace) -> dict[str, list[str]]:
    """name -> overrides: every layer's attention takes the named pattern."""
    pattern = "model.attention_pattern"
    return {
        "dense": [],
        f"window {args.window} + global {args.global_tokens}": [
            f'{pattern}.rules=[[".*", global_local]]', f"{pattern}.window={args.window}",
            f"{pattern}.global_tokens={args.global_tokens}"],
        f"learned gate, density {args.gate_density}": [
            f'{pattern}.rules=[[".*", learned]]', f"{pattern}.gate.density={args.gate_density}",
            f"{pattern}.gate.dense_until={int(args.gate_dense_fraction * args.steps)}"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--data", default="", help="prepared dataset (default: built-in data)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--global-tokens", type=int, default=32)
    parser.add_argument("--gate-density", type=float, default=0.25)
    parser.add_argument("--gate-dense-fraction", type=float, default=0.1,
                        help="share of the steps the learned layers run dense while the gate "
                             "distills")
    parser.add_argument("--run-root", default="runs/attention_compare")
    parser.add_argument("--plot", default="", help="also draw the validation curves to this PNG")
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every run")
    args = parser.parse_args()

    common = [f"model={args.model}", f"train.steps={args.steps}",
              f"data.seq_len={args.seq_len}", f"data.batch_size={args.batch}",
              f"model.attention_pattern.block={args.block}",
              f"train.eval_every={max(1, args.steps // 4)}",
              f"train.checkpoint_every={args.steps}", "train.progress=false"]
    if args.data:
        common += [f"data.path={args.data}", "model.vocab_size=0"]
    rows, run_dirs = [], {}
    for name, overrides in variants(args).items():
        run_dirs[name] = Path(args.run_root) / name.split(",")[0].replace(" ", "_").replace("+", "")
        rows.append((name, spjax_train(name, run_dirs[name],
                                       [*common, *overrides, *args.overrides])))
    dense = rows[0][1]
    print(f"\n{args.model}, {args.steps} steps x {args.batch} x {args.seq_len} tokens, block "
          f"{args.block}, data {args.data or 'built-in default'}")
    print("| attention | final val loss | vs dense | attention FLOPs vs dense | tokens/s |")
    print("|---|---|---|---|---|")
    for name, s in rows:
        if s is None:
            print(f"| {name} | failed: see its log above | | | |")
            continue
        delta = f"{s['final_val_loss'] - dense['final_val_loss']:+.4f}" if dense else ""
        ratio = s["attention_flops_per_token"] / s["dense_attention_flops_per_token"]
        print(f"| {name} | {s['final_val_loss']:.4f} | {delta} | {ratio:.3f} | "
              f"{s['tokens_per_s']:,.0f} |")
    if args.plot:
        plot_metric(run_dirs, "val_loss", Path(args.plot),
                    f"{args.model}, seq {args.seq_len}: validation loss by attention pattern")


if __name__ == "__main__":
    main()
