"""Grouped GEMM (ragged dot) for mixture-of-experts layers, with both gradients.

    reference.py   jax.lax.ragged_dot and its autodiff: the truth
    kernel.py      JAX's shipped Mosaic GPU kernels (Hopper): ragged_dot (forward, and with
                   transpose_rhs the input gradient) and transposed_ragged_dot (weight grad)
    api.py         `grouped_matmul` with a custom VJP and an `implementation=` switch
"""

from pallas_kernels.grouped_gemm.api import ProductTiles, grouped_matmul
from pallas_kernels.grouped_gemm.kernel import Tiles

__all__ = ["ProductTiles", "Tiles", "grouped_matmul"]
