"""Block-sparse matmul Y = X W_s with W_s block-sparse (b x b tiles), all three products.

    reference.py   plain jnp, the truth
    layout.py      block tables (column table, transposed row table) built from a block mask
    kernel.py      Pallas kernels, Triton lowering (any NVIDIA GPU; interpret mode on CPU)
    kernel_mgpu.py Pallas Mosaic GPU kernels (Hopper: TMA + wgmma; GPU interpret mode on CPU)
    api.py         `block_sparse_matmul` with a custom VJP and an `implementation=` switch
    bench.py       GPU benchmark against XLA dense in the same run
"""

from pallas_kernels.block_sparse.api import Tiling, Tilings, block_sparse_matmul
from pallas_kernels.block_sparse.layout import BlockLayout, build_layout

__all__ = ["BlockLayout", "Tiling", "Tilings", "block_sparse_matmul", "build_layout"]
