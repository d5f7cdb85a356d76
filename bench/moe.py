"""Grouped GEMM for MoE on the H200: forward + input grad + weight grad, in one run.

For each shape G:MxKxN (G experts, M token-assignment rows sorted by expert, K in, N out):
  - jax.lax.ragged_dot with autodiff (the XLA baseline),
  - the shipped Mosaic GPU kernels (ragged_dot, ragged_dot with transpose_rhs,
    transposed_ragged_dot) at the tiles of JAX's own example (128/128/64, 4 stages), through
    our custom VJP,
  - ours: the same kernels at spjax's tiles (kernel.Tiles defaults, from a sweep of this
    script), through the same VJP; with --sweep, each product's tiles are re-tuned here.
Group sizes are a multinomial draw over uniform expert probabilities (a load-balanced router).
TFLOP/s counts 3 x 2MKN per forward+backward.

    python bench/moe.py [--shapes 8:16384x4096x4096,64:32768x2048x1408] [--sweep] [--json F]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels.grouped_gemm import ProductTiles, Tiles, grouped_matmul  # noqa: E402
from pallas_kernels.grouped_gemm import kernel  # noqa: E402

EXAMPLE_TILES = Tiles(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4,
                      grid_block_n=1)
from pallas_kernels.timing import median_seconds  # noqa: E402


def candidate_tiles(m_out: int, n_out: int, k_in: int, transposed: bool) -> list[Tiles]:
    """Tilings that divide the problem (the kernels require it) and fit shared memory."""
    out = []
    for bm, bn, bk, steps in itertools.product((64, 128), (64, 128, 256), (64,), (4, 5, 6)):
        gbn = 0  # resolved per width by Tiles.resolved (4, 2 or 1)
        if n_out % bn or k_in % bk:
            continue
        if transposed and m_out % bm:
            continue
        # operand stages in shared memory (bf16) must leave room for the output tile
        if steps * (bm * bk + bk * bn) * 2 + bm * bn * 2 > 220 * 1024:
            continue
        out.append(Tiles(bm, bn, bk, steps, gbn))
    return out


def best_tiles(name: str, fn, candidates: list[Tiles], flops: float) -> tuple[Tiles, float]:
    best, best_s = None, float("inf")
    for tiles in candidates:
        try:
            s = median_seconds(lambda: fn(tiles), calls=10, samples=3)
        except Exception as e:  # noqa: BLE001 - a tiling the compiler rejects is skipped
            print(f"  {name} {tiles}: rejected ({' '.join(str(e).split())[:120]})", flush=True)
            continue
        if s < best_s:
            best, best_s = tiles, s
    print(f"  {name}: best {best} at {flops / best_s / 1e12:.0f} TFLOP/s "
          f"({len(candidates)} tilings tried)", flush=True)
    return best, best_s


def bench_shape(groups: int, m: int, k: int, n: int, sweep: bool) -> dict:
    rng = np.random.default_rng(groups)
    sizes = jnp.asarray(rng.multinomial(m, np.full(groups, 1 / groups)), jnp.int32)
    keys = jax.random.split(jax.random.key(m + k + n), 3)
    lhs = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
    rhs = jax.random.normal(keys[1], (groups, k, n), jnp.bfloat16)
    dout = jax.random.normal(keys[2], (m, n), jnp.bfloat16)
    flops = 2 * m * k * n

    def fwd_bwd(implementation, tiles=ProductTiles()):
        def f(a, b, g):  # every row has a group here (padded=False), as in the dropless layer
            out, vjp = jax.vjp(lambda a, b: grouped_matmul(a, b, sizes, implementation, tiles,
                                                           padded=False), a, b)
            return out, *vjp(g)
        return jax.jit(f)

    xla = fwd_bwd("ragged_dot")
    xla_s = median_seconds(lambda: xla(lhs, rhs, dout))
    print(f"[{groups}:{m}x{k}x{n}] lax.ragged_dot fwd+bwd {3 * flops / xla_s / 1e12:.0f} TFLOP/s",
          flush=True)
    shipped = fwd_bwd("pallas", ProductTiles(EXAMPLE_TILES, EXAMPLE_TILES, EXAMPLE_TILES))
    shipped_s = median_seconds(lambda: shipped(lhs, rhs, dout))
    print(f"[{groups}:{m}x{k}x{n}] shipped kernels, example tiles: "
          f"{3 * flops / shipped_s / 1e12:.0f} TFLOP/s", flush=True)
    row = {"shape": f"{groups}:{m}x{k}x{n}", "ragged_dot_ms": 1e3 * xla_s,
           "ragged_dot_tflops": 3 * flops / xla_s / 1e12, "shipped_ms": 1e3 * shipped_s,
           "shipped_tflops": 3 * flops / shipped_s / 1e12}
    tuned = ProductTiles()
    if sweep:
        fw = jax.jit(kernel.forward, static_argnums=3)
        dx = jax.jit(kernel.input_grad, static_argnums=3)
        dw = jax.jit(kernel.weight_grad, static_argnums=3)
        t_fw, _ = best_tiles("forward", lambda t: fw(lhs, rhs, sizes, t),
                             candidate_tiles(m, n, k, False), flops)
        t_dx, _ = best_tiles("input grad", lambda t: dx(dout, rhs, sizes, t),
                             candidate_tiles(m, k, n, False), flops)
        t_dw, _ = best_tiles("weight grad", lambda t: dw(lhs, dout, sizes, t),
                             candidate_tiles(k, n, m, True), flops)
        tuned = ProductTiles(t_fw, t_dx, t_dw)
    ours = fwd_bwd("pallas", tuned)
    ours_s = median_seconds(lambda: ours(lhs, rhs, dout))
    ref = [np.asarray(v, np.float32) for v in xla(lhs, rhs, dout)]
    got = [np.asarray(v, np.float32) for v in ours(lhs, rhs, dout)]
    err = max(float(np.linalg.norm(g - r) / np.linalg.norm(r)) for g, r in zip(got, ref))
    row |= {"ours_ms": 1e3 * ours_s, "ours_tflops": 3 * flops / ours_s / 1e12,
            "ours_tiles": str(tuned), "max_rel_err_vs_ragged_dot": err}
    print(f"[{groups}:{m}x{k}x{n}] ours: {row['ours_tflops']:.0f} TFLOP/s, rel. error "
          f"vs ragged_dot {err:.1e}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="8:16384x4096x4096,64:32768x2048x1408")
    parser.add_argument("--sweep", action="store_true", help="re-tune each product's tiles")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    if jax.default_backend() != "gpu":
        sys.exit("bench/moe.py: the Mosaic GPU kernels need a Hopper GPU")
    print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}", flush=True)
    rows = []
    for spec in args.shapes.split(","):
        groups, dims = spec.split(":")
        m, k, n = (int(v) for v in dims.split("x"))
        rows.append(bench_shape(int(groups), m, k, n, args.sweep))
    print("\n| experts: M x K x N | lax.ragged_dot | shipped, example tiles | ours | "
          "ours / ragged_dot | ours / shipped |  (fwd+bwd TFLOP/s)")
    print("|---|---|---|---|---|---|")
    for r in rows:
        tuned = r["ours_tflops"]
        print(f"| {r['shape']} | {r['ragged_dot_tflops']:.0f} | {r['shipped_tflops']:.0f} | "
              f"{tuned:.0f} | {tuned / r['ragged_dot_tflops']:.1f}x | "
              f"{tuned / r['shipped_tflops']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
