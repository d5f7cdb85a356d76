"""Plain-jnp block-sparse causal attention: the truth every implementation is tested against.

Shapes follow `jax.nn.dot_product_attention`: q is B x T x H x D, k and v are B x T x Hkv x D,
with H a multiple of Hkv (GQA; Hkv = 1 is MQA). Query head h reads key/value head
h // (H // Hkv). The block mask (..., T/b, T/b) keeps or drops whole (query block, key block)
tiles of b x b; its leading dimensions broadcast against (B, H). With `causal`, key j is
visible to query i only if j <= i as well, and tiles above the diagonal never count.

Logits and softmax statistics are fp32 whatever the input dtype; the output is in q's dtype.

Masked rows. A query whose every key is masked (its whole block row is dropped) attends to
nothing: its output is exactly zero, and no gradient flows through it (dq of that row is
zero, and it contributes nothing to dk or dv). Its log-sum-exp is -inf. Every implementation
follows this convention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def as_4d(block_mask: jax.Array) -> jax.Array:
    """(..., Nq, Nk) with 0-2 leading dims -> (Bm, Hm, Nq, Nk)."""
    return block_mask.reshape((1,) * (4 - block_mask.ndim) + block_mask.shape)


def element_mask(block_mask: jax.Array, block: int, causal: bool) -> jax.Array:
    """(Bm, Hm, T, T) bool: which keys each query may attend to."""
    mask = as_4d(block_mask).astype(bool)
    mask = jnp.repeat(jnp.repeat(mask, block, axis=2), block, axis=3)
    if causal:
        t = mask.shape[-1]
        mask = mask & jnp.tril(jnp.ones((t, t), bool))
    return mask


def attention_with_lse(q_BxTxHxD: jax.Array, k_BxTxGxD: jax.Array, v_BxTxGxD: jax.Array,
                       block_mask: jax.Array, *, block: int, causal: bool = True,
                       scale: float | None = None) -> tuple[jax.Array, jax.Array]:
    """(output B x T x H x D in q's dtype, natural-log log-sum-exp B x H x T in fp32)."""
    b, t, h, d = q_BxTxHxD.shape
    g = k_BxTxGxD.shape[2]
    scale = d ** -0.5 if scale is None else scale
    q = q_BxTxHxD.astype(jnp.float32).reshape(b, t, g, h // g, d)
    k = k_BxTxGxD.astype(jnp.float32)
    v = v_BxTxGxD.astype(jnp.float32)
    # head h = kv head * (H / Hkv) + member: the reshape of (Hkv, H/Hkv) back to H
    s_BxHxTxS = jnp.einsum("btgmd,bsgd->bgmts", q, k,
                           preferred_element_type=jnp.float32).reshape(b, h, t, t) * scale
    mask = element_mask(block_mask, block, causal)
    # masked entries never reach exp: exp(-inf) = 0 with a zero derivative, so no NaN leaks
    # into the gradients, and an empty row has p = 0, output 0 and gradient 0
    m = jax.lax.stop_gradient(jnp.max(jnp.where(mask, s_BxHxTxS, -jnp.inf), axis=-1))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(jnp.where(mask, s_BxHxTxS - m[..., None], -jnp.inf))
    l = jnp.sum(p, axis=-1)
    out = jnp.einsum("bgmts,bsgd->btgmd", p.reshape(b, g, h // g, t, t), v,
                     preferred_element_type=jnp.float32).reshape(b, t, h, d)
    l_safe = jnp.where(l > 0, l, 1.0)
    out = out / jnp.moveaxis(l_safe, 1, 2)[..., None]
    lse = jnp.where(l > 0, m + jnp.log(l_safe), -jnp.inf)
    return out.astype(q_BxTxHxD.dtype), lse


def attention(q_BxTxHxD: jax.Array, k_BxTxGxD: jax.Array, v_BxTxGxD: jax.Array,
              block_mask: jax.Array, *, block: int, causal: bool = True,
              scale: float | None = None) -> jax.Array:
    """Masked softmax attention, differentiable by plain autodiff."""
    return attention_with_lse(q_BxTxHxD, k_BxTxGxD, v_BxTxGxD, block_mask, block=block,
                              causal=causal, scale=scale)[0]
