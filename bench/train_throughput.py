"""Training throughput and MFU of the dense presets on one GPU.

Runs the real `train_step` (AdamW, clipping, bf16 compute, fp32 master weights) on random
tokens of vocabulary 32000 for each preset, and, as the baseline measured in the same run, the
XLA bf16 matmul rate on a large square product: the ceiling a transformer step can approach.

    python bench/train_throughput.py --presets 60m,130m,350m --seq-len 1024 --batch 64

Prints one row per preset: tokens/s, TFLOP/s (6N + causal attention, see spjax/train/accounting.py),
MFU against the 989 TFLOP/s bf16 dense peak, and the ratio to the measured matmul rate.
Needs no dataset and no grain.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels.timing import median_seconds  # noqa: E402
from spjax import parallel  # noqa: E402
from spjax.config import load_config  # noqa: E402
from spjax.errors import ConfigError  # noqa: E402
from spjax.train import accounting as flops_lib  # noqa: E402
from spjax.train.state import Program, init_state, state_layout  # noqa: E402
from spjax.train.step import make_train_step  # noqa: E402


def matmul_baseline(m: int = 8192, n: int = 8192, k: int = 8192) -> float | None:
    """Median TFLOP/s of an XLA bf16 matmul with random operands (never zeros); GPU only."""
    if jax.default_backend() != "gpu":
        return None
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (m, k), jnp.bfloat16)
    b = jax.random.normal(kb, (k, n), jnp.bfloat16)
    f = jax.jit(lambda a, b: a @ b)
    # back to back, one wait per window, as every kernel benchmark here times (timed with a
    # wait per call, it read 528 and 576 TFLOP/s in two runs on one H200)
    return 2 * m * n * k / median_seconds(lambda: f(a, b), calls=20) / 1e12


def preset_config(preset: str, seq_len: int, batch: int, overrides: list[str]):
    return load_config(None, [f"model={preset}", "model.vocab_size=32000", "train.steps=10000",
                              f"data.seq_len={seq_len}", f"data.batch_size={batch}", *overrides])


def bench_preset(preset: str, seq_len: int, batch: int, steps: int, overrides: list[str],
                 profile_dir: str = "") -> dict:
    config = preset_config(preset, seq_len, batch, overrides)
    program = Program.build(config)
    mesh = parallel.make_mesh(config.parallel)
    rules = parallel.sharding_rules(config.parallel)
    layout = state_layout(program, mesh, rules)
    state = init_state(program, layout, seed=0)
    batch_sharding = parallel.batch_sharding(mesh, rules)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 32000, size=(batch, seq_len + 1), dtype=np.int32)
    batch_arrays = parallel.host_to_global(
        {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, batch_sharding)
    print(f"[{preset}] initialized; compiling", flush=True)
    start = time.perf_counter()
    with parallel.activate(mesh, rules):
        step = jax.jit(make_train_step(program),
                       in_shardings=(layout.state, batch_sharding),
                       out_shardings=(layout.state, None), donate_argnums=0)
        compiled = step.lower(state, batch_arrays).compile()
    print(f"[{preset}] compiled in {time.perf_counter() - start:.1f}s", flush=True)
    holder = {"state": state}

    def one():
        holder["state"], metrics = compiled(holder["state"], batch_arrays)
        return metrics["loss"]

    # `steps` steps dispatched back to back, one wait, median of 3 such windows: as the
    # training loop runs (it waits only on logging steps), so the host's dispatch of a step
    # overlaps the GPU's work on the previous one. Waiting after every step instead added
    # the host's per-step dispatch time to every step (3.1 ms dense, 10.5 ms block-sparse at
    # 350M on the H200, docs/BENCHMARKS.md).
    step_s = median_seconds(one, calls=steps, samples=3)
    if profile_dir:  # a Perfetto trace of 3 steps, to see where the step time goes
        with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
            jax.block_until_ready([one() for _ in range(3)])
    tokens_per_s = batch * seq_len / step_s
    flops_per_token = flops_lib.train_flops_per_token(config.model, seq_len)
    memory = jax.devices()[0].memory_stats() or {}
    return {"preset": preset, "params": program.model_def.param_count(), "seq_len": seq_len,
            "batch": batch, "devices": mesh.size, "step_ms": 1e3 * step_s,
            "tokens_per_s": tokens_per_s,
            # per device, so that MFU stays comparable when the mesh grows
            "tflops": tokens_per_s * flops_per_token / mesh.size / 1e12,
            "step_gib": step_memory_gib(compiled),
            "peak_gib": memory.get("peak_bytes_in_use", 0) / 2**30,
            "overrides": overrides}


def step_memory_gib(compiled) -> float:
    """The compiled step's own device footprint: arguments (state and batch) + XLA's temporaries
    + outputs not aliased to donated arguments. Unlike the allocator's peak, which only grows
    over a process, this belongs to one variant, so variants of one run compare fairly."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return 0.0
    total = (analysis.argument_size_in_bytes + analysis.temp_size_in_bytes
             + analysis.output_size_in_bytes - analysis.alias_size_in_bytes)
    return total / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="60m,130m,350m")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", default="64", help="sequences per step: one value, or one per preset")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", default="", help="also write the rows to this file")
    parser.add_argument("--profile", default="", help="trace the last preset into this dir")
    parser.add_argument("--variants", default="",
                        help="';'-separated override sets run for every preset, the first the "
                             "baseline of the ratio column, e.g. 'model.d_ff=2816;model.d_ff="
                             "2816 sparsity.method=static sparsity.pattern=block'")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.remat=dots")
    args = parser.parse_args()

    presets = args.presets.split(",")
    try:
        batches = [int(b) for b in args.batch.split(",")]
    except ValueError:
        parser.error(f"--batch takes one integer or one per preset, got {args.batch!r}")
    batches = batches * len(presets) if len(batches) == 1 else batches
    if len(batches) != len(presets):
        parser.error(f"--batch: {len(batches)} values for {len(presets)} presets")
    variants = [v.split() for v in args.variants.split(";")] if args.variants else [[]]
    for preset, batch in zip(presets, batches):  # every config checked before any GPU work
        for variant in variants:
            try:
                preset_config(preset, args.seq_len, batch, [*args.overrides, *variant])
            except ConfigError as e:
                parser.error(f"{' '.join([preset, *variant])}: {e}")
    peak = flops_lib.peak_flops_per_device()
    device = jax.devices()[0]
    baseline = matmul_baseline()
    print(f"device: {device.device_kind}; jax {jax.__version__}; "
          f"baseline XLA bf16 matmul 8192^3: {baseline or 0:.0f} TFLOP/s", flush=True)
    rows = []
    for i, (preset, batch) in enumerate(zip(presets, batches)):
        for j, variant in enumerate(variants):
            last = i == len(presets) - 1 and j == len(variants) - 1
            row = bench_preset(preset, args.seq_len, batch, args.steps,
                               [*args.overrides, *variant], args.profile if last else "")
            row["variant"] = " ".join(variant)
            row["mfu"] = row["tflops"] * 1e12 / peak if peak else None
            row["vs_matmul"] = row["tflops"] / baseline if baseline else None
            row["vs_first_variant"] = row["tokens_per_s"] / rows[-j]["tokens_per_s"] if j else 1.0
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n| preset | variant | params | seq x batch | step ms | tokens/s | tokens/s vs first "
          f"variant | TFLOP/s per device (dense count) | MFU | vs matmul {baseline or 0:.0f} | "
          f"step GiB | process peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
        print(f"| {r['preset']} | {r['variant'] or '-'} | {r['params'] / 1e6:.1f}M | "
              f"{r['seq_len']} x {r['batch']} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | "
              f"{r['vs_first_variant']:.2f}x | {r['tflops']:.0f} | {mfu} | "
              f"{100 * (r['vs_matmul'] or 0):.0f}% | {r['step_gib']:.1f} | {r['peak_gib']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
