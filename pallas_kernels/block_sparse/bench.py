"""Block-sparse matmul vs XLA dense, measured in the same run (GPU).

For each shape (T x K x N), block size and sparsity, times with random bf16 data:
  - XLA dense: Y = X W, and forward + backward (dX, dW) through jax.vjp;
  - the Pallas block-sparse kernels, forward and forward + backward;
  - the same Pallas kernels with every tile kept ("dense Pallas"), the per-block baseline;
for each kernel family (--implementations): `pallas` (Triton lowering, kernel.py),
`mosaic` (Mosaic GPU, kernel_mgpu.py), and `mosaic_fwd` (Mosaic forward, Triton gradients).
Prints speed-ups over XLA dense and the per-non-zero-block efficiency:
  (non-zero FLOPs / sparse time) / (dense FLOPs / dense-Pallas time).

    python -m pallas_kernels.block_sparse.bench --shapes 8192x4096x4096,16384x4096x16384
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse import kernel
from pallas_kernels.block_sparse.api import (TUNED_TILINGS, Tiling, Tilings, block_sparse_matmul,
                                          default_mosaic_tiling)
from pallas_kernels.block_sparse.kernel_mgpu import MosaicTiling
from pallas_kernels.block_sparse.layout import build_layout
from pallas_kernels.timing import median_seconds

ON_GPU = jax.default_backend() == "gpu"
# On CPU the interpreters stand in, so the script itself can be checked with tiny shapes.
RUNS_AS = {"pallas": "pallas" if ON_GPU else "interpret",
           "mosaic": "mosaic" if ON_GPU else "mosaic_interpret",
           # forward on Mosaic GPU, both gradients on Triton (spjax's sparsity.kernel=mosaic_fwd)
           "mosaic_fwd": "mosaic,pallas,pallas" if ON_GPU else
                         "mosaic_interpret,interpret,interpret",
           # warp-specialized Mosaic forward and input grad, Triton (split-K) weight grad
           "mosaic_ws": "mosaic_ws,mosaic_ws,pallas" if ON_GPU else
                        "mosaic_ws_interpret,mosaic_ws_interpret,interpret",
           # the same with one ring of stages through all of a program's tiles
           "mosaic_stream": "mosaic_stream,mosaic_stream,pallas" if ON_GPU else
                            "mosaic_stream_interpret,mosaic_stream_interpret,interpret",
           # and its weight gradient too (block 128)
           "mosaic_stream_all": "mosaic_stream" if ON_GPU else "mosaic_stream_interpret"}
# '<name>_d1': the same kernels with one wgmma left in flight per compute warpgroup
# (MosaicTiling.delay_release=1), to compare with <name> in one run
DELAYED = ("mosaic_ws", "mosaic_stream", "mosaic_stream_all")
RUNS_AS |= {f"{name}_d1": RUNS_AS[name] for name in DELAYED}


def mosaic_tiling(implementation: str, base: MosaicTiling | None = None) -> MosaicTiling | None:
    """The Mosaic tiling a bench implementation name asks for: `base`, or when None the API's
    default for that kernel (None lets block_sparse_matmul choose it)."""
    if implementation.endswith("_d1"):
        base = base or default_mosaic_tiling(RUNS_AS[implementation])
        return dataclasses.replace(base, delay_release=1)
    return base


def forward_and_backward(mm, x, w, dy):
    """Y, dX and dW. Y must be returned: a linear layer's backward reads only X and W, so
    without it XLA drops the forward as dead code and 'forward + backward' times only the
    backward (the case before 2026-11-30, session 5)."""
    y, vjp = jax.vjp(mm, x, w)
    return y, *vjp(dy)


def input_grad_only(mm, x, w, dy):
    """dX alone: the forward and dW are dead code, so XLA drops them (dense and kernels)."""
    return jax.vjp(mm, x, w)[1](dy)[0]


def weight_grad_only(mm, x, w, dy):
    return jax.vjp(mm, x, w)[1](dy)[1]


def random_mask(key, shape, density: float) -> jax.Array:
    """Exactly round(density * tiles) kept tiles, chosen at random."""
    n = shape[0] * shape[1]
    keep = int(round(density * n))
    order = jax.random.permutation(key, n)
    return jnp.zeros(n, bool).at[order[:keep]].set(True).reshape(shape)


def bench_shape(t: int, k: int, n: int, blocks: list[int], sparsities: list[float],
                reps: int, implementations: list[str],
                mosaic: MosaicTiling | None = None) -> list[dict]:
    keys = jax.random.split(jax.random.key(t + k + n), 4)
    x = jax.random.normal(keys[0], (t, k), jnp.bfloat16)
    w = jax.random.normal(keys[1], (k, n), jnp.bfloat16)
    dy = jax.random.normal(keys[2], (t, n), jnp.bfloat16)
    flops = 2 * t * k * n

    dense_fwd = jax.jit(lambda x, w: jnp.dot(x, w))
    dense_fb = jax.jit(lambda x, w, dy: forward_and_backward(jnp.dot, x, w, dy))
    xla_fwd = median_seconds(lambda: dense_fwd(x, w), reps)
    xla_fb = median_seconds(lambda: dense_fb(x, w, dy), reps)
    xla_products = products_ms(jnp.dot, x, w, dy, reps)
    rows = []
    for block, implementation in itertools.product(blocks, implementations):
        def sparse_fns(layout):
            def mm(a, b):
                return block_sparse_matmul(a, b, layout, block=block,
                                           mosaic=mosaic_tiling(implementation, mosaic),
                                           implementation=RUNS_AS[implementation])

            fwd = jax.jit(mm)
            fb = jax.jit(lambda a, b, g: forward_and_backward(mm, a, b, g))
            return mm, fwd, fb

        full = build_layout(jnp.ones((k // block, n // block), bool))
        _, full_fwd, full_fb = sparse_fns(full)
        pallas_dense_fwd = median_seconds(lambda: full_fwd(x, w), reps)
        pallas_dense_fb = median_seconds(lambda: full_fb(x, w, dy), reps)
        for sparsity in sparsities:
            mask = random_mask(keys[3], (k // block, n // block), 1 - sparsity)
            density = float(mask.mean())
            mm, fwd, fb = sparse_fns(build_layout(mask))
            s_fwd = median_seconds(lambda: fwd(x, w), reps)
            s_fb = median_seconds(lambda: fb(x, w, dy), reps)
            sparse_products = products_ms(mm, x, w, dy, reps)
            row = {
                "shape": f"{t}x{k}x{n}", "block": block, "implementation": implementation,
                "sparsity": 1 - density,
                "xla_fwd_ms": 1e3 * xla_fwd, "xla_fb_ms": 1e3 * xla_fb,
                "pallas_dense_fwd_ms": 1e3 * pallas_dense_fwd,
                "pallas_dense_fb_ms": 1e3 * pallas_dense_fb,
                "sparse_fwd_ms": 1e3 * s_fwd, "sparse_fb_ms": 1e3 * s_fb,
                "xla_tflops": flops / xla_fwd / 1e12,
                "pallas_dense_tflops": flops / pallas_dense_fwd / 1e12,
                "speedup_fwd": xla_fwd / s_fwd, "speedup_fb": xla_fb / s_fb,
                "block_eff_fwd": (density * flops / s_fwd) / (flops / pallas_dense_fwd),
                "block_eff_fb": (density * 3 * flops / s_fb) / (3 * flops / pallas_dense_fb),
                **{f"xla_{name}": ms for name, ms in xla_products.items()},
                **{f"sparse_{name}": ms for name, ms in sparse_products.items()},
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def products_ms(mm, x, w, dy, reps: int) -> dict[str, float]:
    """The input gradient and the weight gradient timed alone (ms): which product limits."""
    dx = jax.jit(lambda a, b, g: input_grad_only(mm, a, b, g))
    dw = jax.jit(lambda a, b, g: weight_grad_only(mm, a, b, g))
    return {"dx_ms": 1e3 * median_seconds(lambda: dx(x, w, dy), reps),
            "dw_ms": 1e3 * median_seconds(lambda: dw(x, w, dy), reps)}


def sweep(t: int, k: int, n: int, block: int, sparsity: float, reps: int) -> Tilings:
    """Times each kernel alone over candidate tilings at one shape and sparsity; returns the
    fastest per kernel (paste it into api.TUNED_TILINGS)."""
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (t, k), jnp.bfloat16)
    w = jax.random.normal(keys[1], (k, n), jnp.bfloat16)
    dy = jax.random.normal(keys[2], (t, n), jnp.bfloat16)
    layout = build_layout(random_mask(keys[3], (k // block, n // block), 1 - sparsity))
    interpret = not ON_GPU
    products = {
        "forward": lambda c: kernel.forward(
            x, w, layout.col_table, layout.col_count, block=block, block_t=c.rows,
            interpret=interpret, num_warps=c.num_warps, num_stages=c.num_stages),
        "input_grad": lambda c: kernel.input_grad(
            dy, w, layout.row_table, layout.row_count, block=block, block_t=c.rows,
            interpret=interpret, num_warps=c.num_warps, num_stages=c.num_stages),
        "weight_grad": lambda c: kernel.weight_grad(
            x, dy, layout.block_mask, block=block, block_t=c.rows, interpret=interpret,
            out_dtype=jnp.bfloat16, num_warps=c.num_warps, num_stages=c.num_stages),
    }
    flops = 2 * t * k * n * float(layout.block_mask.mean())
    best = {}
    for name, fn in products.items():
        timings = []
        for rows, warps, stages in itertools.product((64, 128, 256), (4, 8), (2, 3, 4)):
            tiling = Tiling(rows, warps, stages)
            run = jax.jit(lambda c=tiling, fn=fn: fn(c))
            try:
                seconds = median_seconds(run, reps)
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: skip it
                print(f"  {name} {tiling}: failed ({' '.join(str(e).split())[:100]})")
                continue
            timings.append((seconds, tiling))
            print(f"  {name} {tiling}: {flops / seconds / 1e12:.0f} TFLOP/s (non-zero)",
                  flush=True)
        seconds, best[name] = min(timings, key=lambda st: st[0])
        print(f"{name}: best {best[name]} at {flops / seconds / 1e12:.0f} TFLOP/s", flush=True)
    return Tilings(**best)


def mosaic_candidates(name: str) -> list[MosaicTiling]:
    """The tilings `--sweep` tries for a Mosaic implementation name."""
    if name == "mosaic":
        return [MosaicTiling(block_m=block_m, max_concurrent_steps=steps, grid_block_n=grid)
                for block_m, steps, grid in itertools.product((64, 128), (2, 3, 4, 5), (1, 2, 4))]
    # warp-specialized: 2 x 128-row tiles, at most 3 stages fit; the sweep is tile order (L2
    # reuse), ring depth and wgmma's left in flight
    return [MosaicTiling(max_concurrent_steps=steps, grid_block_n=grid, delay_release=delay)
            for steps, grid, delay in itertools.product((2, 3), (1, 2, 4, 8), (0, 1))
            if delay < steps]


def sweep_mosaic(t: int, k: int, n: int, block: int, sparsity: float,
                 reps: int, name: str = "mosaic") -> MosaicTiling:
    """Forward + backward over Mosaic tilings at one shape and sparsity; returns the fastest."""
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (t, k), jnp.bfloat16)
    w = jax.random.normal(keys[1], (k, n), jnp.bfloat16)
    dy = jax.random.normal(keys[2], (t, n), jnp.bfloat16)
    layout = build_layout(random_mask(keys[3], (k // block, n // block), 1 - sparsity))
    flops = 3 * 2 * t * k * n * float(layout.block_mask.mean())
    timings = []
    for tiling in mosaic_candidates(name):
        def mm(a, b, tiling=tiling):
            return block_sparse_matmul(a, b, layout, block=block, mosaic=tiling,
                                       implementation=RUNS_AS[name])

        fb = jax.jit(lambda a, b, g, mm=mm: forward_and_backward(mm, a, b, g))
        try:
            seconds = median_seconds(lambda: fb(x, w, dy), reps)
        except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: skip it
            print(f"  {tiling}: failed ({' '.join(str(e).split())[:100]})")
            continue
        timings.append((seconds, tiling))
        print(f"  {tiling}: {flops / seconds / 1e12:.0f} TFLOP/s fwd+bwd (non-zero)", flush=True)
    seconds, best = min(timings, key=lambda st: st[0])
    print(f"{name} block {block}: best {best} at {flops / seconds / 1e12:.0f} TFLOP/s")
    return best


def _parse(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """--blocks, --shapes and --implementations, checked: a bad value is a one-line error."""
    try:
        blocks = [int(b) for b in args.blocks.split(",")]
        shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",")]
        [float(x) for x in args.sparsities.split(",")]
    except ValueError:
        parser.error("--blocks, --sparsities and --shapes take comma-separated numbers; a shape "
                     "is TxKxN, e.g. --shapes 8192x4096x4096")
    if any(len(shape) != 3 for shape in shapes):
        parser.error(f"--shapes: each shape is TxKxN (tokens x d_in x d_out), got {args.shapes}")
    for _, k, n in shapes:
        for b in blocks:
            if k % b or n % b:
                parser.error(f"--blocks: {b} does not divide the weight {k}x{n}")
    implementations = args.implementations.split(",")
    unknown = [i for i in implementations if i not in RUNS_AS]
    if unknown:
        parser.error(f"--implementations: unknown {unknown}; choose from {list(RUNS_AS)}")
    return blocks, shapes, implementations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="8192x4096x4096,16384x4096x4096,8192x4096x16384,"
                                            "16384x4096x16384")
    parser.add_argument("--blocks", default="64,128")
    parser.add_argument("--sparsities", default="0.5,0.75,0.9")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--implementations", default="pallas,mosaic",
                        help="of pallas (Triton lowering), mosaic (Mosaic GPU), mosaic_fwd "
                             "(Mosaic forward, Triton gradients), mosaic_ws (warp-specialized "
                             "Mosaic forward and input grad, Triton weight grad), mosaic_stream "
                             "(mosaic_ws with one ring through all tiles), mosaic_stream_all "
                             "(and its weight grad); a _d1 suffix keeps one wgmma in flight")
    parser.add_argument("--sweep", action="store_true",
                        help="instead: tune each kernel's tiling at the first shape, 75%% "
                             "sparse (pallas; mosaic; mosaic_ws / mosaic_stream[_all]: tile "
                             "order, ring depth, delay_release)")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    blocks, shapes, implementations = _parse(parser, args)
    print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}", flush=True)
    if args.sweep:
        t, k, n = shapes[0]
        for block in blocks:
            if "pallas" in implementations:
                print(f"block {block}: {sweep(t, k, n, block, 0.75, args.reps)}", flush=True)
            for name in ("mosaic", "mosaic_ws", "mosaic_stream", "mosaic_stream_all"):
                if name in implementations:
                    sweep_mosaic(t, k, n, block, 0.75, args.reps, name)
        return
    for block in blocks:
        print(f"block {block}: {TUNED_TILINGS.get(block, Tilings())}")
    rows = []
    for t, k, n in shapes:
        rows += bench_shape(t, k, n, blocks, [float(s) for s in args.sparsities.split(",")],
                            args.reps, implementations)
    print("\n| shape | block | kernels | sparsity | XLA dense fwd / fwd+bwd ms | sparse fwd / "
          "fwd+bwd ms | speed-up fwd | speed-up fwd+bwd | per-block eff. fwd / fwd+bwd | "
          "all-tiles kernel TFLOP/s (XLA) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['block']} | {r['implementation']} | {r['sparsity']:.0%} | "
              f"{r['xla_fwd_ms']:.2f} / {r['xla_fb_ms']:.2f} | {r['sparse_fwd_ms']:.2f} / "
              f"{r['sparse_fb_ms']:.2f} | {r['speedup_fwd']:.2f}x | {r['speedup_fb']:.2f}x | "
              f"{r['block_eff_fwd']:.0%} / {r['block_eff_fb']:.0%} | "
              f"{r['pallas_dense_tflops']:.0f} ({r['xla_tflops']:.0f}) |")
    print("\nEach product alone (ms, sparse / XLA dense, and the speed-up):\n")
    print("| shape | block | kernels | sparsity | forward | input grad | weight grad |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [f"{r[f'sparse_{p}_ms']:.2f} / {r[f'xla_{p}_ms']:.2f} "
                 f"({r[f'xla_{p}_ms'] / r[f'sparse_{p}_ms']:.2f}x)" for p in ("fwd", "dx", "dw")]
        print(f"| {r['shape']} | {r['block']} | {r['implementation']} | {r['sparsity']:.0%} | "
              + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
