"""Prefill and KV-cache decode steps over a spjax Transformer, for any weight structure.

Generation never goes through the training step: `prefill` runs the prompt through every
block with each layer's own projections and attention (its pattern, sparse or dense, exactly
as in training), keeps each layer's keys and values in a `KVCache`, and returns the logits
of each prompt's last token; `decode_step` then feeds one token per sequence, attending to
the cached keys that the layer's pattern allows for that position.

Prompts of different lengths are right-padded: under causal attention the padding, after
every real token, changes nothing they compute, and each sequence then decodes from its
own position (per-row RoPE angles, per-row cache writes). Linears, experts and norms are the
model's modules, so every structure (masked, N:M, block-sparse, low-rank, MoE) decodes as it
trains. Two approximations, both documented in docs/INTEROP.md: an MoE layer with a capacity
factor routes the prompt's padding too (dropless routing, the default, is exact); a learned
attention gate's layer attends at decode time to every causal key (its block choice pools
queries of a whole block, which a single new token does not have).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from spjax.config import LEARNED, attention_patterns
from spjax.model.transformer import Block, Transformer, rope_tables


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    keys: tuple[jax.Array, ...]  # per layer [B, S, G, K]
    values: tuple[jax.Array, ...]  # per layer [B, S, G, K]
    lengths: jax.Array  # int32 [B]: tokens held (the next token's position)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[1]


def prefill(model: Transformer, tokens_BxT: jax.Array, lengths_B: jax.Array, capacity: int
            ) -> tuple[jax.Array, KVCache]:
    """(fp32 logits of each sequence's last prompt token [B, V], the cache of the prompts),
    the cache holding `capacity` positions (prompt plus the tokens to generate)."""
    config = model.config
    b, t = tokens_BxT.shape
    cos_TxK, sin_TxK = rope_tables(t, config.head_dim, config.rope_theta)
    x_BxTxD = jnp.take(model.embed[...], tokens_BxT, axis=0).astype(model.compute_dtype)
    keys, values = [], []
    for block in model.layers:
        h_BxTxD = block.attn_norm(x_BxTxD)
        q, k, v = block.attn.project(h_BxTxD, cos_TxK, sin_TxK)
        out_BxTxHxK, _ = block.attn.attend(q, k, v)
        x_BxTxD = x_BxTxD + block.attn.o(out_BxTxHxK.reshape(b, t, -1))
        x_BxTxD = x_BxTxD + _mlp(block, x_BxTxD)
        pad = ((0, 0), (0, capacity - t), (0, 0), (0, 0))
        keys.append(jnp.pad(k, pad))
        values.append(jnp.pad(v, pad))
    last_BxD = jnp.take_along_axis(x_BxTxD, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    logits = model.lm_head(model.final_norm(last_BxD)).astype(jnp.float32)
    return logits, KVCache(tuple(keys), tuple(values), lengths_B.astype(jnp.int32))


def decode_step(model: Transformer, cache: KVCache, tokens_B: jax.Array
                ) -> tuple[jax.Array, KVCache]:
    """One new token per sequence at its own position: (fp32 logits [B, V], the cache with
    the token's keys and values added)."""
    config = model.config
    b = tokens_B.shape[0]
    positions_B = cache.lengths
    cos_SxK, sin_SxK = rope_tables(cache.capacity, config.head_dim, config.rope_theta)
    cos_Bx1xK, sin_Bx1xK = cos_SxK[positions_B][:, None], sin_SxK[positions_B][:, None]
    x_Bx1xD = jnp.take(model.embed[...], tokens_B[:, None], axis=0).astype(model.compute_dtype)
    rows = jnp.arange(b)
    keys, values = [], []
    for block, cached_k, cached_v in zip(model.layers, cache.keys, cache.values):
        h_Bx1xD = block.attn_norm(x_Bx1xD)
        q_Bx1xHxK, k_Bx1xGxK, v_Bx1xGxK = block.attn.project(h_Bx1xD, cos_Bx1xK, sin_Bx1xK)
        cached_k = cached_k.at[rows, positions_B].set(k_Bx1xGxK[:, 0])
        cached_v = cached_v.at[rows, positions_B].set(v_Bx1xGxK[:, 0])
        allowed_BxS = _allowed_keys(block, positions_B, cache.capacity)
        out_BxHxK = _attend_one(q_Bx1xHxK[:, 0], cached_k, cached_v, allowed_BxS)
        x_Bx1xD = x_Bx1xD + block.attn.o(out_BxHxK.reshape(b, 1, -1))
        x_Bx1xD = x_Bx1xD + _mlp(block, x_Bx1xD)
        keys.append(cached_k)
        values.append(cached_v)
    logits = model.lm_head(model.final_norm(x_Bx1xD[:, 0])).astype(jnp.float32)
    return logits, KVCache(tuple(keys), tuple(values), positions_B + 1)


def _mlp(block: Block, x_BxTxD: jax.Array) -> jax.Array:
    if block.is_moe:
        return block.moe(block.mlp_norm(x_BxTxD))[0]
    return block.mlp(block.mlp_norm(x_BxTxD))


def _allowed_keys(block: Block, positions_B: jax.Array, capacity: int) -> jax.Array:
    """bool [B, S] (or [B, H, S] for a per-head pattern): the cached positions the new token
    may attend to: causal (<= its own position) and, for a static sparse pattern, in a key
    block the pattern keeps for the token's query block (the table the prefill skips by)."""
    keys_S = jnp.arange(capacity)
    allowed_BxS = keys_S[None, :] <= positions_B[:, None]
    attn = block.attn
    if attn.pattern in ("dense", LEARNED):
        return allowed_BxS
    section = attn.pattern_config
    mask = attention_patterns.build(attn.pattern, seq_len=capacity, block=section.block,
                                    window=section.window, global_tokens=section.global_tokens,
                                    stride=section.stride, dilation=section.dilation,
                                    path=section.path, heads=attn.q_heads)
    tiles = jnp.asarray(np.asarray(mask, bool))
    query_blocks, key_blocks = positions_B // section.block, keys_S // section.block
    if tiles.ndim == 3:  # one mask per query head
        kept_BxHxS = tiles[:, query_blocks][:, :, key_blocks].transpose(1, 0, 2)
        return allowed_BxS[:, None, :] & kept_BxHxS
    return allowed_BxS & tiles[query_blocks][:, key_blocks]


def _attend_one(q_BxHxK: jax.Array, keys_BxSxGxK: jax.Array, values_BxSxGxK: jax.Array,
                allowed_BxS: jax.Array) -> jax.Array:
    """Softmax attention of one query per sequence over its cache, fp32 statistics; query
    head h reads key/value head h // (H / G), as in training. `allowed_BxS`: [B, S], or
    [B, H, S] with one row per query head."""
    b, h, k = q_BxHxK.shape
    g = keys_BxSxGxK.shape[2]
    q_BxGxRxK = q_BxHxK.reshape(b, g, h // g, k).astype(jnp.float32)
    scores = jnp.einsum("bgrk,bsgk->bgrs", q_BxGxRxK, keys_BxSxGxK.astype(jnp.float32))
    scores = scores / jnp.sqrt(jnp.float32(k))
    if allowed_BxS.ndim == 3:  # per query head: [B, H, S] -> [B, G, H/G, S]
        allowed = allowed_BxS.reshape(b, g, h // g, -1)
    else:
        allowed = allowed_BxS[:, None, None, :]
    scores = jnp.where(allowed, scores, -jnp.inf)
    weights = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bgrs,bsgk->bgrk", weights, values_BxSxGxK.astype(jnp.float32))
    return out.reshape(b, h, k).astype(q_BxHxK.dtype)
