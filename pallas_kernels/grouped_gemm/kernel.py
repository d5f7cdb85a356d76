"""Mosaic GPU grouped GEMMs shipped with JAX (jax.experimental.pallas.ops.gpu), Hopper only.

`Tiles` holds one kernel's tiling (bench/moe.py sweeps them). Both kernels need lhs and rhs of one dtype (bf16 here) and K a multiple of block_k; the
transposed kernel (weight gradient) also needs M and N multiples of its tiles.
"""

from __future__ import annotations

import dataclasses
import functools

import jax

from pallas_kernels.device import hopper_gpu


@dataclasses.dataclass(frozen=True)
class Tiles:
    """One kernel's tiling. The defaults won bench/moe.py's sweep on the H200 for every
    product at both MoE shapes (8 x 4096 x 4096 and 64 x 2048 x 1408); grid_block_n (output
    column tiles a program walks, for L2 reuse) is then the largest of 4, 2, 1 that divides."""
    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    max_concurrent_steps: int = 5
    grid_block_n: int = 0  # 0: chosen from the output width by `resolved`

    def resolved(self, n_out: int) -> "Tiles":
        if self.grid_block_n:
            return self
        block_n = self.block_n if n_out % self.block_n == 0 else 64
        tiles = n_out // block_n
        grid = next(g for g in (4, 2, 1) if tiles % g == 0)
        return dataclasses.replace(self, block_n=block_n, grid_block_n=grid)


def supported(d_in: int, d_out: int) -> bool:
    """Whether all three kernels take a (d_in -> d_out) expert weight on this machine: a
    Hopper GPU, and widths that are multiples of the tiles (block_k 64 for the contracted
    dims, 64 for output columns, 128 for the weight gradient's rows)."""
    return hopper_gpu() and d_in % 128 == 0 and d_out % 128 == 0


@functools.partial(jax.jit, static_argnames=("tiles",))
def forward(lhs_MxK, rhs_GxKxN, sizes_G, tiles: Tiles = Tiles()) -> jax.Array:
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    tiles = tiles.resolved(rhs_GxKxN.shape[2])
    return ragged_dot_mgpu.ragged_dot(lhs_MxK, rhs_GxKxN, group_sizes=sizes_G,
                                      **dataclasses.asdict(tiles))


@functools.partial(jax.jit, static_argnames=("tiles",))
def input_grad(dout_MxN, rhs_GxKxN, sizes_G, tiles: Tiles = Tiles()) -> jax.Array:
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    tiles = tiles.resolved(rhs_GxKxN.shape[1])
    return ragged_dot_mgpu.ragged_dot(dout_MxN, rhs_GxKxN, group_sizes=sizes_G,
                                      transpose_rhs=True, **dataclasses.asdict(tiles))


@functools.partial(jax.jit, static_argnames=("tiles",))
def weight_grad(lhs_MxK, dout_MxN, sizes_G, tiles: Tiles = Tiles()) -> jax.Array:
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu

    tiles = tiles.resolved(dout_MxN.shape[1])
    return transposed_ragged_dot_mgpu.transposed_ragged_dot(
        lhs_MxK, dout_MxN, group_sizes=sizes_G, **dataclasses.asdict(tiles))
