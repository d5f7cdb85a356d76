"""Block-sparse attention vs cuDNN and XLA dense causal attention, measured in the same run.

For each sequence length T (batch B = tokens / T), random bf16 q, k, v (H heads, Hkv kv
heads, head_dim D) and random dO, times forward and forward + backward (dQ, dK, dV) of:
  - cuDNN:  jax.nn.dot_product_attention(..., is_causal=True, implementation="cudnn")
            (GPU only), the baseline;
  - XLA:    the same with implementation="xla" (materializes the logits; reported as
            "oom" when it does not fit);
  - Pallas dense: the block-sparse kernels with every causal tile kept (per-tile baseline;
            target: within 15% of cuDNN);
  - Pallas sparse: random kept tiles at each block sparsity, counted against the causal
            tiles (the diagonal is always kept, so no row is empty); target: >= 5x cuDNN
            at T = 32k, 90% sparse.
The kernels of each of `--implementations` (default pallas: Triton lowering; mosaic: Mosaic
GPU; mosaic_fwd: Mosaic forward with the Triton backward) are measured in the same run, one
table each; on CPU their interpreters stand in (RUNS_AS).
TFLOP/s use the useful FLOPs: 4 B H D T^2 / 2 for causal attention forward (x (1 - sparsity)
for sparse), backward 2.5x forward.

    python bench/attention.py                       # H200: T 4k-32k, 50/75/90% sparse
    python bench/attention.py --seqs 128 --tokens 256 --heads 2 --kv-heads 1 --head-dim 16 \\
        --blocks 32 --sparsities 0.5 --reps 1       # CPU: interpret mode, checks the script
    python bench/attention.py --implementations pallas,mosaic   # H200: both beside cuDNN
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse_attention.api import block_sparse_attention
from pallas_kernels.block_sparse_attention.kernel_mgpu import MosaicAttentionTiling
from pallas_kernels.block_sparse_attention.layout import build_layout, causal_block_mask
from pallas_kernels.timing import median_seconds

ON_GPU = jax.default_backend() == "gpu"
PALLAS = "pallas" if ON_GPU else "interpret"  # on CPU the interpreter stands in
MOSAIC = "mosaic" if ON_GPU else "mosaic_interpret"
TWO_KERNELS = MosaicAttentionTiling(fused_backward=False)
# Mosaic tilings to compare with the default (fused backward, split dQ) in one run
TILINGS = {
    # the two-kernel backward (dQ, dK/dV) and its earlier forms: in place and overlapped; a
    # fresh accumulator per step; in place without the overlap
    "mosaic_two_kernels": TWO_KERNELS,
    "mosaic_fresh": dataclasses.replace(TWO_KERNELS, backward_in_place=False,
                                        backward_overlap=False),
    "mosaic_acc": dataclasses.replace(TWO_KERNELS, backward_overlap=False),
    # the default with programs started in grid order (shortest causal rows first)
    "mosaic_in_order": MosaicAttentionTiling(largest_first=False),
    # the fused backward with each warpgroup adding its own keys' dQ, ring depths 2, 3
    "mosaic_fused": MosaicAttentionTiling(fused_split_dq=False, fused_steps=2),
    "mosaic_fused3": MosaicAttentionTiling(fused_split_dq=False, fused_steps=3),
    # fused, each warpgroup computing half of dQ's columns (fused_split_dq: the default)
    "mosaic_split": MosaicAttentionTiling(fused_split_dq=True, fused_steps=2),
    "mosaic_split3": MosaicAttentionTiling(fused_split_dq=True, fused_steps=3),
    # every operand through shared memory, no ping-pong, 40 memory registers: the default
    # until session 10 (the interpreter's form); the default's backward in that form
    "mosaic_shared": MosaicAttentionTiling(forward_registers=False, forward_pingpong=False,
                                           backward_registers=False,
                                           backward_memory_registers=40),
    "mosaic_backward_shared": MosaicAttentionTiling(backward_registers=False),
    # the forward's forms set explicitly (the default resolves them by head_dim: kernel_mgpu):
    # ping-pong alone; P from registers and O rescaled in place (FA3), alone and with
    # ping-pong; and the fused backward's register operands too, at every head_dim
    "mosaic_pingpong": MosaicAttentionTiling(forward_registers=False, forward_pingpong=True),
    "mosaic_registers": MosaicAttentionTiling(forward_registers=True, forward_pingpong=False),
    "mosaic_registers_pingpong": MosaicAttentionTiling(forward_registers=True,
                                                       forward_pingpong=True),
    "mosaic_all_registers": MosaicAttentionTiling(forward_registers=True,
                                                  backward_registers=True),
    # the fused backward's memory warpgroup at 40 registers (232 per compute thread) and at
    # 24 (240), whatever the head_dim
    "mosaic_memory40": MosaicAttentionTiling(backward_memory_registers=40),
    "mosaic_memory24": MosaicAttentionTiling(backward_memory_registers=24),
    # the forward and fused backward with Pallas's automatic barriers around every
    # shared-memory store, the default before session 12
    "mosaic_auto_barriers": MosaicAttentionTiling(auto_barriers=True),
}
RUNS_AS = {"pallas": PALLAS,
           "mosaic": MOSAIC,
           # forward on Mosaic GPU, dQ and dK/dV on Triton (api: one per pass)
           "mosaic_fwd": "mosaic,pallas" if ON_GPU else "mosaic_interpret,interpret",
           **{name: MOSAIC for name in TILINGS}}


def random_causal_mask(seed: int, n: int, sparsity: float) -> np.ndarray:
    """(n, n) causal block mask: the diagonal plus random lower tiles, so that the kept
    fraction of the n (n + 1) / 2 causal tiles is 1 - sparsity (at least the diagonal)."""
    causal = n * (n + 1) // 2
    keep = max(n, int(round((1 - sparsity) * causal)))
    rows, cols = np.tril_indices(n, -1)
    chosen = np.random.default_rng(seed).permutation(len(rows))[:keep - n]
    mask = np.eye(n, dtype=bool)
    mask[rows[chosen], cols[chosen]] = True
    return mask


def _timed(fn, args, reps):
    f = jax.jit(fn)
    fb = jax.jit(lambda q, k, v, do: jax.vjp(fn, q, k, v)[1](do))
    q, k, v, do = args
    try:
        return (median_seconds(lambda: f(q, k, v), reps),
                median_seconds(lambda: fb(q, k, v, do), reps))
    except Exception as e:  # noqa: BLE001 - XLA's attention runs out of memory at long T
        if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
            return None, None
        raise


def bench_seq(t: int, batch: int, heads: int, kv_heads: int, head_dim: int, blocks: list[int],
              sparsities: list[float], reps: int, with_xla: bool,
              implementations: tuple[str, ...] = ("pallas",)) -> list[dict]:
    """One row per (block, implementation, sparsity); cuDNN and XLA measured once."""
    keys = jax.random.split(jax.random.key(t), 4)
    q = jax.random.normal(keys[0], (batch, t, heads, head_dim), jnp.bfloat16)
    k = jax.random.normal(keys[1], (batch, t, kv_heads, head_dim), jnp.bfloat16)
    v = jax.random.normal(keys[2], (batch, t, kv_heads, head_dim), jnp.bfloat16)
    do = jax.random.normal(keys[3], (batch, t, heads, head_dim), jnp.bfloat16)
    args = (q, k, v, do)
    fwd_flops = 4 * batch * heads * head_dim * t * t / 2

    def dense(implementation):
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                            implementation=implementation)

    cudnn = _timed(dense("cudnn"), args, reps) if ON_GPU else (None, None)
    xla = _timed(dense("xla"), args, reps) if with_xla else (None, None)
    rows = []
    for block, name in itertools.product(blocks, implementations):
        n = t // block

        def sparse(mask, implementation=RUNS_AS[name], block=block, tiling=TILINGS.get(name)):
            layout = build_layout(mask)  # numpy tables: constants of the jitted function
            return lambda q, k, v: block_sparse_attention(q, k, v, layout, block=block,
                                                          implementation=implementation,
                                                          mosaic=tiling)

        try:
            p_dense = _timed(sparse(causal_block_mask(n)), args, reps)
        except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: report, go on
            print(f"# {name} block {block} T {t}: failed ({' '.join(str(e).split())[:200]})",
                  flush=True)
            continue
        for sparsity in sparsities:
            mask = random_causal_mask(t + block, n, sparsity)
            kept = mask.sum() / (n * (n + 1) / 2)
            s_fwd, s_fb = _timed(sparse(mask), args, reps)
            ms = lambda x: None if x is None else 1e3 * x  # noqa: E731
            ratio = lambda a, b: None if a is None or b is None else a / b  # noqa: E731
            row = {
                "T": t, "B": batch, "H": heads, "Hkv": kv_heads, "D": head_dim,
                "block": block, "sparsity": 1 - kept, "implementation": name,
                "cudnn_fwd_ms": ms(cudnn[0]), "cudnn_fb_ms": ms(cudnn[1]),
                "xla_fwd_ms": ms(xla[0]), "xla_fb_ms": ms(xla[1]),
                "pallas_dense_fwd_ms": ms(p_dense[0]), "pallas_dense_fb_ms": ms(p_dense[1]),
                "sparse_fwd_ms": ms(s_fwd), "sparse_fb_ms": ms(s_fb),
                "dense_vs_cudnn_fwd": ratio(cudnn[0], p_dense[0]),
                "dense_vs_cudnn_fb": ratio(cudnn[1], p_dense[1]),
                "speedup_fwd": ratio(cudnn[0], s_fwd), "speedup_fb": ratio(cudnn[1], s_fb),
                "speedup_fb_vs_pallas_dense": ratio(p_dense[1], s_fb),
                "cudnn_fb_tflops": ratio(3.5e-12 * fwd_flops, cudnn[1]),
                "pallas_dense_fb_tflops": ratio(3.5e-12 * fwd_flops, p_dense[1]),
                "sparse_fb_tflops": ratio(3.5e-12 * kept * fwd_flops, s_fb),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def _time_candidates(candidates: dict[str, Callable], t: int, batch: int, heads: int,
                     kv_heads: int, head_dim: int, block: int, sparsity: float,
                     reps: int) -> None:
    """Forward and forward + backward of each candidate (label -> fn(q, k, v, layout)) on
    the same random bf16 inputs and causal block mask; a failing one is reported, skipped."""
    keys = jax.random.split(jax.random.key(0), 4)
    shape_q, shape_kv = (batch, t, heads, head_dim), (batch, t, kv_heads, head_dim)
    args = tuple(jax.random.normal(key, shape, jnp.bfloat16)
                 for key, shape in zip(keys, (shape_q, shape_kv, shape_kv, shape_q)))
    layout = build_layout(random_causal_mask(0, t // block, sparsity))
    for label, candidate in candidates.items():
        fn = lambda q, k, v, c=candidate: c(q, k, v, layout)  # noqa: E731
        try:
            fwd, fb = _timed(fn, args, reps)
        except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: skip it
            print(f"  {label}: failed ({' '.join(str(e).split())[:100]})")
            continue
        print(f"  block {block} {label}: fwd {1e3 * fwd:.2f} ms, fwd+bwd {1e3 * fb:.2f} ms",
              flush=True)


def sweep(t: int, batch: int, heads: int, kv_heads: int, head_dim: int, block: int,
          sparsity: float, reps: int) -> None:
    """Forward + backward over Triton launch parameters at one shape and sparsity."""
    candidates = {
        f"warps {w} stages {s}": functools.partial(
            block_sparse_attention, block=block, implementation=PALLAS, num_warps=w,
            num_stages=s)
        for w, s in itertools.product((4, 8), (1, 2, 3, 4))}
    _time_candidates(candidates, t, batch, heads, kv_heads, head_dim, block, sparsity, reps)


def mosaic_candidates() -> dict[str, MosaicAttentionTiling]:
    """`--sweep`'s Mosaic tilings: the default, then each of its kernels' TMA ring depths
    and the fused backward's dQ split varied alone (the kernels hold different tiles per
    slot, so one shared depth that is best for one can overflow another's shared memory)."""
    default = MosaicAttentionTiling()
    candidates = {"default": default}
    for field, values in (("forward_steps", (3, 4)), ("fused_steps", (2, 3)),
                          ("fused_split_dq", (not default.fused_split_dq,))):
        for value in values:
            candidates[f"{field}={value}"] = dataclasses.replace(default, **{field: value})
    return candidates


def sweep_mosaic(t: int, batch: int, heads: int, kv_heads: int, head_dim: int, block: int,
                 sparsity: float, reps: int) -> None:
    """Forward + backward over the Mosaic kernels' TMA ring depths (mosaic_candidates)."""
    candidates = {
        label: functools.partial(block_sparse_attention, block=block,
                                 implementation=RUNS_AS["mosaic"], mosaic=tiling)
        for label, tiling in mosaic_candidates().items()}
    _time_candidates(candidates, t, batch, heads, kv_heads, head_dim, block, sparsity, reps)


def _fmt(x, spec=".2f", suffix=""):
    return "-" if x is None else f"{x:{spec}}{suffix}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", default="4096,8192,16384,32768")
    parser.add_argument("--tokens", type=int, default=32768, help="B x T per measurement")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--blocks", default="128,64")
    parser.add_argument("--sparsities", default="0.5,0.75,0.9")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-xla", action="store_true", help="skip XLA's dense attention")
    parser.add_argument("--implementations", default="pallas",
                        help=f"kernels to measure, comma-separated: {', '.join(RUNS_AS)}")
    parser.add_argument("--sweep", action="store_true",
                        help="instead: Triton warps/stages (pallas) and Mosaic ring depths "
                        "(mosaic) at the first T and the first of --sparsities")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    try:
        seqs = [int(s) for s in args.seqs.split(",")]
        blocks = [int(b) for b in args.blocks.split(",")]
        [float(x) for x in args.sparsities.split(",")]
    except ValueError:
        parser.error("--seqs, --blocks and --sparsities take comma-separated numbers, e.g. "
                     "--seqs 4096,8192 --blocks 128 --sparsities 0.5,0.9")
    if bad := [(t, b) for t in seqs for b in blocks if t % b]:
        parser.error(f"--blocks: {bad[0][1]} does not divide sequence length {bad[0][0]}")
    names = tuple(s.strip() for s in args.implementations.split(","))
    if unknown := [n for n in names if n not in RUNS_AS]:
        parser.error(f"--implementations: unknown {', '.join(unknown)}; choose from "
                     f"{', '.join(RUNS_AS)}")
    kernels = ", ".join(f"{n} = {RUNS_AS[n]}" for n in names)
    print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; kernels: {kernels}",
          flush=True)
    if args.sweep:
        for block, name in itertools.product(blocks, names):
            run = {"pallas": sweep, "mosaic": sweep_mosaic}.get(name)
            if run:
                run(seqs[0], max(1, args.tokens // seqs[0]), args.heads, args.kv_heads,
                    args.head_dim, block, float(args.sparsities.split(",")[0]), args.reps)
        return
    rows = []
    for t in seqs:
        rows += bench_seq(t, max(1, args.tokens // t), args.heads, args.kv_heads, args.head_dim,
                          blocks, [float(s) for s in args.sparsities.split(",")], args.reps,
                          with_xla=not args.no_xla, implementations=names)
    for name in names:
        _table(name, [r for r in rows if r["implementation"] == name])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


def _table(name: str, rows: list[dict]) -> None:
    """The markdown table of one implementation ("Pallas" columns: its kernels)."""
    print(f"\nkernels: {name} ({RUNS_AS[name]})")
    print("\n| T | B | block | sparsity | cuDNN fwd / fwd+bwd ms | XLA fwd+bwd ms | Pallas dense "
          "fwd / fwd+bwd ms (cuDNN/Pallas) | sparse fwd / fwd+bwd ms | speed-up vs cuDNN fwd / "
          "fwd+bwd | TFLOP/s fwd+bwd cuDNN / dense / sparse (useful) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['T']} | {r['B']} | {r['block']} | {r['sparsity']:.0%} | "
              f"{_fmt(r['cudnn_fwd_ms'])} / {_fmt(r['cudnn_fb_ms'])} | "
              f"{_fmt(r['xla_fb_ms'])} | {_fmt(r['pallas_dense_fwd_ms'])} / "
              f"{_fmt(r['pallas_dense_fb_ms'])} ({_fmt(r['dense_vs_cudnn_fb'], suffix='x')}) | "
              f"{_fmt(r['sparse_fwd_ms'])} / {_fmt(r['sparse_fb_ms'])} | "
              f"{_fmt(r['speedup_fwd'], suffix='x')} / {_fmt(r['speedup_fb'], suffix='x')} | "
              f"{_fmt(r['cudnn_fb_tflops'], '.0f')} / {_fmt(r['pallas_dense_fb_tflops'], '.0f')}"
              f" / {_fmt(r['sparse_fb_tflops'], '.0f')} |")


if __name__ == "__main__":
    main()
