"""`block_sparse_attention(q, k, v, layout_or_mask, block=..., causal=True, implementation=...)`

Softmax attention restricted to the kept (query block, key block) tiles of a block mask,
differentiable through a custom VJP whose backward also skips dropped tiles:

  implementation="xla"        plain jnp (reference.py), plain autodiff: runs anywhere, no
                              skipping (materializes the T x T logits)
  implementation="pallas"     Pallas flash-attention kernels, Triton lowering (kernel.py):
                              any NVIDIA GPU
  implementation="interpret"  the same kernels, interpreted on CPU (tests)
  implementation="mosaic"     Mosaic GPU kernels (kernel_mgpu.py, kernel_mgpu_fused_bwd.py or
                              kernel_mgpu_bwd.py: TMA, wgmma, warp specialization): Hopper;
                              bf16/f16, blocks 64 and 128, head_dim 64 or 128
  implementation="mosaic_interpret"  the same, under Mosaic GPU's interpret mode on CPU (tests)
  implementation="mosaic,pallas"     one for the forward, one for the backward (dQ, dK/dV):
                              any two kernel implementations (both keep the same base-2 lse)

Shapes as in `jax.nn.dot_product_attention`: q B x T x H x D, k and v B x T x Hkv x D with H a
multiple of Hkv (GQA, MQA); the output is B x T x H x D in q's dtype. The mask is (T/b, T/b),
(H, T/b, T/b) or (B, H, T/b, T/b) (leading sizes 1 broadcast), or an `AttentionLayout`
already built from one (build it once per mask: `build_layout`).

A query row whose every key is masked gets output 0 and zero gradients (reference.py).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse_attention import kernel, kernel_mgpu, kernel_mgpu_bwd, reference
from pallas_kernels.block_sparse_attention.layout import AttentionLayout, build_layout

SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
IMPLEMENTATIONS = ("xla", "pallas", "interpret", "mosaic", "mosaic_interpret")
GPU_BLOCKS = (64, 128)  # tiles the GPU kernels are meant for; tests interpret smaller ones
MOSAIC_DTYPES = (jnp.bfloat16, jnp.float16)  # wgmma's 16-bit operand types
MOSAIC_HEAD_DIMS = (64, 128)  # 128-byte swizzled rows; fp32 dK and dV must fit in registers


class BlockSparseAttentionError(ValueError):
    """Bad input to block-sparse attention (shapes, mask, heads, block size, dtype)."""


@dataclasses.dataclass(frozen=True)
class Settings:
    block: int
    causal: bool
    scale: float
    implementations: tuple[str, str]  # forward, backward
    num_warps: int
    num_stages: int
    mosaic: kernel_mgpu.MosaicAttentionTiling = kernel_mgpu.MosaicAttentionTiling()


def block_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                           layout_or_mask: AttentionLayout | jax.Array | np.ndarray, *,
                           block: int, causal: bool = True, implementation: str = "xla",
                           scale: float | None = None, num_warps: int | None = None,
                           num_stages: int = 2,
                           mosaic: kernel_mgpu.MosaicAttentionTiling | None = None) -> jax.Array:
    """`scale` defaults to 1/sqrt(D); `num_warps` (default 4, 8 for D > 64) and `num_stages`
    tune the Triton kernels, `mosaic` the Mosaic GPU ones (TMA ring depths)."""
    check(q, k, v, layout_or_mask, block=block, causal=causal, implementation=implementation,
          mosaic=mosaic)
    layout = layout_or_mask
    if not isinstance(layout, AttentionLayout):
        layout = build_layout(layout, causal=causal)
    d = q.shape[-1]
    settings = Settings(block, causal, d ** -0.5 if scale is None else float(scale),
                        per_pass(implementation), num_warps or (4 if d <= 64 else 8),
                        num_stages, mosaic or kernel_mgpu.MosaicAttentionTiling())
    if implementation == "xla":
        return reference.attention(q, k, v, layout.block_mask, block=block, causal=causal,
                                   scale=settings.scale)
    return _attention(q, k, v, layout, settings)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, layout, settings):
    return _forward(q, k, v, layout, settings)[0]


def per_pass(implementation: str) -> tuple[str, str]:
    """'mosaic' -> ('mosaic', 'mosaic'); 'mosaic,pallas' -> (forward, backward)."""
    parts = tuple(p.strip() for p in implementation.split(","))
    return (parts * 2 if len(parts) == 1 else parts)  # type: ignore[return-value]


# Forward and backward are jitted so that layers with equal shapes share one lowering of the
# kernels (one func.call each), instead of lowering them again at every layer's call site.
@functools.partial(jax.jit, static_argnames=("s",))
def _forward(q, k, v, layout, s):
    impl = s.implementations[0]
    if impl.startswith("mosaic"):
        return kernel_mgpu.forward(q, k, v, layout, block=s.block, scale=s.scale,
                                   interpret=impl == "mosaic_interpret", tiling=s.mosaic)
    return kernel.forward(q, k, v, layout, block=s.block, scale=s.scale,
                          interpret=impl == "interpret",
                          num_warps=s.num_warps, num_stages=s.num_stages)


def _attention_fwd(q, k, v, layout, settings):
    o, lse = _forward(q, k, v, layout, settings)
    return o, (q, k, v, o, lse, layout)


def _attention_bwd(s, residuals, do):
    q, k, v, o, lse, layout = residuals
    dq, dk, dv = _backward(q, k, v, o, lse, do, layout, s)
    no_grad = jax.tree.map(lambda a: np.zeros(a.shape, jax.dtypes.float0), layout)
    return dq, dk, dv, no_grad


@functools.partial(jax.jit, static_argnames=("s",))
def _backward(q, k, v, o, lse, do, layout, s):
    impl = s.implementations[1]
    if impl.startswith("mosaic"):
        dq, dk, dv = kernel_mgpu_bwd.backward(q, k, v, o, lse, do.astype(q.dtype), layout,
                                              block=s.block, scale=s.scale,
                                              interpret=impl == "mosaic_interpret",
                                              tiling=s.mosaic)
    else:
        dq, dk, dv = kernel.backward(q, k, v, o, lse, do.astype(q.dtype), layout,
                                     block=s.block, scale=s.scale,
                                     interpret=impl == "interpret", num_warps=s.num_warps,
                                     num_stages=s.num_stages)
    return dq, dk, dv


_attention.defvjp(_attention_fwd, _attention_bwd)


def check(q, k, v, layout_or_mask, *, block: int, causal: bool, implementation: str,
          mosaic: kernel_mgpu.MosaicAttentionTiling | None = None) -> None:
    """Every bad input as a one-line BlockSparseAttentionError naming the fix."""
    passes = per_pass(implementation)
    if (implementation not in IMPLEMENTATIONS and
            (len(passes) != 2 or any(p not in IMPLEMENTATIONS[1:] for p in passes))):
        raise BlockSparseAttentionError(
            f"implementation must be one of {', '.join(IMPLEMENTATIONS)}, or two kernel ones "
            f"for forward,backward (e.g. 'mosaic,pallas'), got {implementation!r}")
    for name, a in (("q", q), ("k", k), ("v", v)):
        if a.ndim != 4:
            raise BlockSparseAttentionError(f"{name} must be B x T x heads x head_dim, got "
                                            f"shape {a.shape}")
    if k.shape != v.shape:
        raise BlockSparseAttentionError(f"k {k.shape} and v {v.shape} must have the same shape")
    b, t, h, d = q.shape
    if k.shape[0] != b or k.shape[1] != t or k.shape[3] != d:
        raise BlockSparseAttentionError(f"q {q.shape} and k {k.shape} must agree in batch, "
                                        f"sequence length and head_dim (self-attention)")
    hkv = k.shape[2]
    if h % hkv:
        raise BlockSparseAttentionError(f"{h} query heads are not a multiple of {hkv} key/value "
                                        f"heads; GQA needs query heads = group x kv heads")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        raise BlockSparseAttentionError(f"q, k, v must share one dtype of bfloat16, float16, "
                                        f"float32; got {q.dtype}, {k.dtype}, {v.dtype}")
    if block <= 0 or t % block:
        raise BlockSparseAttentionError(f"sequence length {t} is not a multiple of block "
                                        f"{block}; pad the sequence or pick a block dividing it")
    n = t // block
    is_layout = isinstance(layout_or_mask, AttentionLayout)
    mask = layout_or_mask.block_mask if is_layout else layout_or_mask
    shape = tuple(getattr(mask, "shape", ()))
    if not 2 <= len(shape) <= 4:
        raise BlockSparseAttentionError(
            f"the block mask must be an array of shape (T/b, T/b), (H, T/b, T/b) or "
            f"(B, H, T/b, T/b), got {shape if hasattr(mask, 'shape') else type(mask).__name__}")
    lead = (1,) * (4 - len(shape)) + shape[:-2]
    if shape[-2:] != (n, n) or lead[0] not in (1, b) or lead[1] not in (1, h):
        raise BlockSparseAttentionError(
            f"block mask has shape {shape}, but T={t} in blocks of {block} with B={b}, H={h} "
            f"needs ({n}, {n}), ({h}, {n}, {n}) or ({b}, {h}, {n}, {n}) (leading sizes may be "
            f"1); build it for this sequence length and block")
    if is_layout and layout_or_mask.causal != causal:
        raise BlockSparseAttentionError(f"the layout was built with causal="
                                        f"{layout_or_mask.causal} but the call has causal="
                                        f"{causal}; rebuild it with build_layout")
    if implementation != "xla":
        for what, size in (("block", block), ("head_dim", d)):
            if size < 16 or size & (size - 1):
                raise BlockSparseAttentionError(
                    f"the Pallas kernels need a power-of-two {what} >= 16, got {size}; use "
                    f"implementation='xla' or pad")
    if any(p.startswith("mosaic") for p in passes):
        if q.dtype not in MOSAIC_DTYPES:
            raise BlockSparseAttentionError(
                f"the Mosaic GPU kernels take bfloat16 or float16 q, k, v (wgmma operands), got "
                f"{q.dtype}; cast them or use implementation='pallas'")
        if block not in GPU_BLOCKS:
            raise BlockSparseAttentionError(
                f"the Mosaic GPU kernels support blocks 64 and 128 (64 query rows per "
                f"warpgroup), got {block}; use implementation='pallas' for other blocks")
        if d not in MOSAIC_HEAD_DIMS:
            raise BlockSparseAttentionError(
                f"the Mosaic GPU kernels support head_dim 64 or 128 (fp32 dK, dV accumulators "
                f"in registers), got {d}; use implementation='pallas'")
    if mosaic is not None:
        # the register-operand forms: Mosaic GPU's interpreter (jax 0.11.2) runs no wgmma
        # with a register operand and no in-place accumulator, so they are GPU only
        forward, backward = passes
        gpu_only = [name for name, interpreted in (
            ("forward_registers", forward == "mosaic_interpret"),
            ("backward_registers", backward == "mosaic_interpret" and mosaic.fused_backward))
            if interpreted and getattr(mosaic, name)]
        if gpu_only:
            raise BlockSparseAttentionError(
                f"MosaicAttentionTiling.{gpu_only[0]} runs on the GPU only (the interpreter has "
                f"no wgmma register operand); set it to False for mosaic_interpret")
