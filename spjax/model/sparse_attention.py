"""Block-sparse attention inside the model: a layer's static pattern (model.attention_pattern)
-> its block mask and tables, built once per (pattern, sequence length) at trace time, so
they are constants of the compiled step -> the kernels of pallas_kernels/block_sparse_attention.
A learned gate's mask (attention_gate.py) is computed inside the step instead: `attend_mask`
builds its tables in the graph (layout.py's jnp path), and the kernels read them as operands.

The Pallas kernels are opaque to XLA's partitioner, so under a mesh they run inside
`shard_map`: sequences split over the batch axes, heads over `tensor`, each device attending
its own shard (attention never mixes sequences or heads). With grouped key/value heads the
shards of q and k/v line up, because query head h reads key/value head h // (H / G) and both
head counts are divisible by the tensor size (checked in config). The plain-jnp path ('xla')
is left to the partitioner like any other op.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from pallas_kernels.block_sparse_attention import (AttentionLayout, BlockSparseAttentionError,
                                                   block_sparse_attention, build_layout)
from pallas_kernels.block_sparse_attention.api import MOSAIC_DTYPES, MOSAIC_HEAD_DIMS
from pallas_kernels.block_sparse_attention.kernel_mgpu import MosaicAttentionTiling
from pallas_kernels.device import hopper_gpu
from spjax import parallel
from spjax.config import AttentionPatternConfig
from spjax.errors import ConfigError, require_gpu
from spjax.config import attention_patterns


@functools.lru_cache(maxsize=64)
def block_mask(kind: str, seq_len: int, section: AttentionPatternConfig, heads: int
               ) -> np.ndarray:
    """(T/b, T/b) or, for a per-head file, (heads, T/b, T/b) bool."""
    return attention_patterns.build(kind, seq_len=seq_len, block=section.block,
                                    window=section.window, global_tokens=section.global_tokens,
                                    stride=section.stride, dilation=section.dilation,
                                    path=section.path, heads=heads)


@functools.lru_cache(maxsize=64)
def layout(kind: str, seq_len: int, section: AttentionPatternConfig, heads: int
           ) -> AttentionLayout:
    return build_layout(block_mask(kind, seq_len, section, heads))  # numpy tables


# Config names for a Mosaic forward with the Triton backward (forward, backward)
KERNEL_COMBINATIONS = {"mosaic_fwd": "mosaic,pallas"}


def resolve_kernel(kernel: str, dtype: jax.typing.DTypeLike | None = None, block: int = 0,
                   head_dim: int = 0) -> str:
    """Config names of per-pass pairs -> the implementation string of block_sparse_attention;
    'auto' -> on a Hopper GPU at block 128 with 16-bit q, k, v and head_dim 64 or 128 the
    Mosaic GPU kernels (60M at 8k tokens on the H200: 1.37x dense tokens/s against Triton's
    1.22x for window + global, 1.26x against 1.16x for the learned gate, compiles within 3 s
    of Triton's, docs/BENCHMARKS.md), the Triton kernels on other GPUs and settings (block 64
    on Mosaic is not measured in training), the plain-jnp reference off GPU."""
    if kernel in ("pallas", "mosaic", "mosaic_fwd"):
        require_gpu(f"model.attention_pattern.kernel={kernel} runs GPU kernels",
                    "kernel=auto (the jnp reference here), interpret or mosaic_interpret")
    if kernel != "auto":
        return KERNEL_COMBINATIONS.get(kernel, kernel)
    if jax.default_backend() != "gpu":
        return "xla"
    fits = (hopper_gpu() and block == 128 and head_dim in MOSAIC_HEAD_DIMS
            and dtype is not None and jnp.dtype(dtype) in MOSAIC_DTYPES)
    return "mosaic" if fits else "pallas"


def attend(q_BxTxHxK: jax.Array, k_BxTxHxK: jax.Array, v_BxTxHxK: jax.Array, kind: str,
           section: AttentionPatternConfig, name: str) -> jax.Array:
    """Causal attention of layer `name` under its pattern `kind`."""
    t, heads = q_BxTxHxK.shape[1], q_BxTxHxK.shape[2]
    try:
        tables = layout(kind, t, section, heads)
    except ConfigError as e:
        raise ConfigError(f"layer '{name}' at sequence length {t}: {e}") from None
    return _run(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, tables, section, name)


def check_block(seq_len: int, block: int, name: str) -> None:
    if seq_len % block:
        raise ConfigError(f"layer '{name}' at sequence length {seq_len}: the sequence length "
                          f"must be a multiple of the attention block ({block})")


def attend_mask(q_BxTxHxK: jax.Array, k_BxTxHxK: jax.Array, v_BxTxHxK: jax.Array,
                mask: jax.Array, section: AttentionPatternConfig, name: str) -> jax.Array:
    """Causal attention of layer `name` under a block mask computed in the step (traced):
    (B, H, T/b, T/b) bool, one per sequence and query head. The tables are built in the graph
    (an argsort per row); the 'xla' path reads only the mask, so XLA drops them there."""
    check_block(q_BxTxHxK.shape[1], section.block, name)
    return _run(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, build_layout(mask), section, name)


def _run(q, k, v, tables: AttentionLayout, section: AttentionPatternConfig, name: str
         ) -> jax.Array:
    implementation = resolve_kernel(section.kernel, q.dtype, section.block, q.shape[-1])
    call = functools.partial(block_sparse_attention, block=section.block,
                             implementation=implementation,
                             mosaic=MosaicAttentionTiling(fused_backward=section.fused_backward))
    try:
        active = parallel.active()
        if implementation == "xla" or active is None:
            return call(q, k, v, tables)
        return _sharded(call, active, q, k, v, tables)
    except BlockSparseAttentionError as e:
        raise ConfigError(f"layer '{name}': {e}") from None


def _sharded(call, active, q, k, v, tables: AttentionLayout) -> jax.Array:
    mesh, rules = active
    spec = parallel.logical_to_spec(("batch", None, "heads", None), q.shape, rules, mesh)
    kv_spec = parallel.logical_to_spec(("batch", None, "heads", None), k.shape, rules, mesh)
    head_axes = spec[2]
    if kv_spec != spec:  # a shard's query heads must find their key/value heads on it
        raise ConfigError(f"{q.shape[2]} query heads split as {spec} but {k.shape[2]} "
                          f"key/value heads as {kv_spec}; use a number of key/value heads "
                          f"(model.n_kv_heads) divisible by parallel.tensor")
    # per-sequence tables (a learned gate's) split with the batch, per-head ones with heads
    table_spec = jax.tree.map(
        lambda a: P(spec[0] if a.shape[0] > 1 else None, head_axes if a.shape[1] > 1 else None),
        tables)

    def body(q, k, v, tables):
        return call(q, k, v, tables)

    return jax.shard_map(body, mesh=mesh, in_specs=(spec, kv_spec, kv_spec, table_spec),
                         out_specs=spec, check_vma=False)(q, k, v, tables)
