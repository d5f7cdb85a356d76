"""Block-sparse (flash) attention: softmax attention over the kept tiles of a block mask.

    reference.py   plain jnp masked causal attention, GQA/MQA, fp32 softmax: the truth
    layout.py      per query block the kept key blocks, per key block the kept query blocks
    kernel.py      Pallas kernels, Triton lowering: forward, dQ, dK/dV (interpret on CPU)
    kernel_mgpu.py Mosaic GPU (Hopper TMA + wgmma) forward and shared helpers
    kernel_mgpu_bwd.py  Mosaic GPU backward: the dQ and dK/dV kernels, and the entry point
    kernel_mgpu_fused_bwd.py  Mosaic GPU fused backward (the default): dQ by TMA reduce-add
    api.py         `block_sparse_attention` with a custom VJP and an `implementation=` switch
    bench.py       GPU benchmark against cuDNN and XLA dense attention in the same run
"""

from pallas_kernels.block_sparse_attention.api import (BlockSparseAttentionError,
                                                       block_sparse_attention)
from pallas_kernels.block_sparse_attention.layout import (AttentionLayout, build_layout,
                                                          causal_block_mask)

__all__ = ["AttentionLayout", "BlockSparseAttentionError", "block_sparse_attention",
           "build_layout", "causal_block_mask"]
