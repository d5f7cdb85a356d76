"""A SeerAttention-style learned attention gate: the block mask of `learned` layers.

Per layer and per key/value head g (query heads h with h // (H / G) = g share one mask, so
GQA groups read the same tiles), with b = model.attention_pattern.block, N = T / b:

  pooled Q   q_i = concat over the group's H/G query heads of mean_{t in block i} Q[t]
             ((H/G)·k features); SeerAttention pools Q by its average
  pooled K   k_j = concat(mean, max, min)_{t in block j} K[t]  (3k features): its best K
             pooling (min and max keep a block's outlier keys visible to the gate)
  scores     S_ij = (q_i W_q)·(k_j W_k) / sqrt(d_gate) for j <= i (causal blocks), with
             W_q (G, (H/G)·k, d_gate), W_k (G, 3k, d_gate): `layers/{i}/attn/gate/{q,k}`
  gate       P_gate = softmax_j(S_i·) over the causal key blocks of row i

Q and K enter after RoPE (the very tensors the attention uses) and under stop_gradient, and
the mask selection is not differentiable, so the gate's parameters learn only from the
distillation loss and the distillation loss trains only the gate:

  target     A = softmax(Q K^T / sqrt(k)) dense causal, per query head (stop_gradient);
             T_ij = max over the group's heads and the b x b tile (i, j) of A, then each row
             renormalized to sum 1 (SeerAttention's max-pooled attention map)
  loss       KL(T_i || P_gate,i) = sum_j T_ij (log T_ij - log P_gate,ij), mean over
             sequences, groups and query blocks

The mask keeps the diagonal block always (and block 0 with `keep_first`), so no row is empty:
top-k keeps k_i = max(ceil(density · (i + 1)), forced_i) blocks of row i, highest gate
probability first (forced blocks count towards k_i); with `threshold` > 0 it keeps instead
every causal block of gate probability >= threshold, plus the forced ones. Until step
`dense_until` the attention runs dense (an all-causal mask) while the gate distills.

The target is computed one query block at a time (`lax.map`), so it never holds more than
B x H x b x T probabilities; it costs one extra dense Q K^T forward per learned layer, in XLA
(SeerAttention fuses it into its attention kernel). `gate.target_row_stride` s computes it
for every s-th query block row only (ending at the last), and the loss and recall on those.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from pallas_kernels.block_sparse_attention import gate_target
from spjax import parallel
from spjax.config import AttentionPatternConfig, ModelConfig
from spjax.errors import require_gpu
from spjax.model import sparse_attention


class AttentionGate(nnx.Module):
    """The gate's two projections; fp32, replicated (tiny: G x (H/G + 3) k x d_gate)."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        g, h, k = config.kv_heads, config.q_heads, config.head_dim
        d_gate = config.attention_pattern.gate.d_gate

        def init(fan_in: int) -> jax.Array:  # unit-variance scores at init (LeCun normal)
            return jax.random.normal(rngs.params(), (g, fan_in, d_gate), jnp.float32) \
                * fan_in ** -0.5

        self.q = nnx.Param(init(h // g * k), axes=(None, None, None))
        self.k = nnx.Param(init(3 * k), axes=(None, None, None))

    def log_probs(self, q_BxTxHxK: jax.Array, k_BxTxGxK: jax.Array, block: int) -> jax.Array:
        """log P_gate, (B, G, N, N) fp32; -inf above the block diagonal."""
        return gate_log_probs(self.q[...], self.k[...], q_BxTxHxK, k_BxTxGxK, block)


def pool_q(q_BxTxHxK: jax.Array, groups: int, block: int) -> jax.Array:
    """(B, G, N, (H/G)·k): block means of the query heads, concatenated per group."""
    b, t, h, k = q_BxTxHxK.shape
    mean = q_BxTxHxK.astype(jnp.float32).reshape(b, t // block, block, h, k).mean(axis=2)
    return jnp.moveaxis(mean.reshape(b, t // block, groups, h // groups * k), 2, 1)


def pool_k(k_BxTxGxK: jax.Array, block: int) -> jax.Array:
    """(B, G, N, 3k): block mean, max and min of each key/value head's keys."""
    b, t, g, k = k_BxTxGxK.shape
    x = k_BxTxGxK.astype(jnp.float32).reshape(b, t // block, block, g, k)
    pooled = jnp.concatenate([x.mean(axis=2), x.max(axis=2), x.min(axis=2)], axis=-1)
    return jnp.moveaxis(pooled, 2, 1)


def causal_blocks(n: int) -> np.ndarray:
    return np.tril(np.ones((n, n), bool))


def gate_log_probs(w_q: jax.Array, w_k: jax.Array, q_BxTxHxK: jax.Array,
                   k_BxTxGxK: jax.Array, block: int) -> jax.Array:
    """log softmax over causal key blocks of the gate scores, (B, G, N, N); Q and K are
    stop-gradient here, so only w_q and w_k get gradients."""
    q = jax.lax.stop_gradient(q_BxTxHxK)
    k = jax.lax.stop_gradient(k_BxTxGxK)
    groups = k.shape[2]
    pq = jnp.einsum("bgnc,gcd->bgnd", pool_q(q, groups, block), w_q)
    pk = jnp.einsum("bgnc,gcd->bgnd", pool_k(k, block), w_k)
    scores = jnp.einsum("bgid,bgjd->bgij", pq, pk) / math.sqrt(w_q.shape[-1])
    n = scores.shape[-1]
    return jax.nn.log_softmax(jnp.where(causal_blocks(n), scores, -jnp.inf), axis=-1)


def forced_blocks(n: int, keep_first: bool) -> np.ndarray:
    """(N, N) bool: the diagonal, and key block 0 with keep_first."""
    forced = np.eye(n, dtype=bool)
    if keep_first:
        forced[:, 0] = True
    return forced


def topk_counts(n: int, density: float, keep_first: bool) -> np.ndarray:
    """(N,) int: k_i = max(ceil(density (i + 1)), forced blocks of row i), at most i + 1."""
    rows = np.arange(1, n + 1)
    # the small slack keeps 0.25 x 4 = 1.0000000002 from rounding up to 2
    k = np.ceil(density * rows - 1e-9).astype(np.int32)
    return np.clip(k, forced_blocks(n, keep_first).sum(axis=1), rows)


def block_mask(log_probs: jax.Array, *, density: float, threshold: float = 0.0,
               keep_first: bool = False) -> jax.Array:
    """(..., N, N) bool causal block mask from the gate's log-probabilities: top-k per row
    (threshold 0) or probability >= threshold; forced blocks always kept."""
    n = log_probs.shape[-1]
    causal, forced = causal_blocks(n), forced_blocks(n, keep_first)
    if threshold > 0:
        return (causal & (log_probs >= math.log(threshold))) | forced
    score = jnp.where(forced, jnp.inf, jnp.where(causal, log_probs, -jnp.inf))
    # rank of each key block in its row, best first; stable, so ties keep the lower index
    rank = jnp.argsort(jnp.argsort(-score, axis=-1, stable=True), axis=-1, stable=True)
    return causal & (rank < topk_counts(n, density, keep_first)[:, None])


def target_rows(n: int, stride: int) -> np.ndarray:
    """The query block rows that get a distillation target: every `stride`-th, ending at the
    last row (the one with the most key blocks); all rows with stride 1."""
    return np.arange(n - 1, -1, -stride)[::-1]


def distill_target(q_BxTxHxK: jax.Array, k_BxTxGxK: jax.Array, block: int,
                   scale: float | None = None, rows: np.ndarray | None = None,
                   implementation: str = "xla") -> jax.Array:
    """(B, G, R, N) fp32 for the R query block `rows` (default all N): dense causal attention
    probabilities, max-pooled over the group's heads and each b x b tile, rows renormalized.
    Stop-gradient. `implementation` 'xla' (jnp, one query block at a time), or 'pallas' /
    'interpret': the fused kernel of pallas_kernels/block_sparse_attention/gate_target.py.
    Q K^T runs in the inputs' dtype (bf16 on GPU) with fp32 accumulation, as the attention
    itself does; the softmax statistics are fp32."""
    q = jax.lax.stop_gradient(q_BxTxHxK)
    k = jax.lax.stop_gradient(k_BxTxGxK)
    d = q.shape[-1]
    rows = np.arange(q.shape[1] // block) if rows is None else np.asarray(rows)
    scale = d ** -0.5 if scale is None else scale
    if implementation != "xla":
        pooled = gate_target.max_pooled_attention(q, k, block, rows, scale=scale,
                                                  interpret=implementation == "interpret")
    else:
        pooled = _max_pooled_attention(q, k, block, rows, scale)
    return pooled / pooled.sum(axis=-1, keepdims=True)


def _max_pooled_attention(q: jax.Array, k: jax.Array, block: int, rows: np.ndarray,
                          scale: float) -> jax.Array:
    """(B, G, R, N), un-normalized, in jnp: one query block row at a time (`lax.map`)."""
    b, t, h, d = q.shape
    g, n = k.shape[2], t // block
    q_blocks = jnp.moveaxis(q.reshape(b, n, block, g, h // g, d), 1, 0)[rows]
    keys = jnp.arange(t)

    def row(args):
        i, q_i = args  # q_i: (B, b, G, H/G, d)
        s = jnp.einsum("brgmd,bsgd->bgmrs", q_i, k, preferred_element_type=jnp.float32)
        visible = keys[None, :] <= i * block + jnp.arange(block)[:, None]  # (b, T)
        s = jnp.where(visible, s * scale, -jnp.inf)
        # max over a tile of p = exp(s - lse) is exp(max over the tile of s - lse): two
        # reductions of s instead of writing and re-reading the probabilities
        lse = jax.nn.logsumexp(s, axis=-1)  # (B, G, H/G, b)
        tile_max = s.reshape(b, g, h // g, block, n, block).max(axis=-1)
        return jnp.exp(tile_max - lse[..., None]).max(axis=(2, 3))  # (B, G, N)

    return jnp.moveaxis(jax.lax.map(row, (jnp.asarray(rows), q_blocks)), 0, 2)


def target_implementation(kernel: str) -> str:
    """gate.target_kernel -> distill_target's implementation. 'auto': the fused kernel on GPU
    (on the H200 at 8k tokens it took the 60M step from 242 to 88 ms against XLA's target,
    docs/ATTENTION.md), the jnp target elsewhere."""
    if kernel == "pallas":
        require_gpu("model.attention_pattern.gate.target_kernel=pallas runs a GPU kernel",
                    "target_kernel=auto (the jnp target here) or interpret")
    if kernel != "auto":
        return kernel
    return "pallas" if jax.default_backend() == "gpu" else "xla"


def layer_target(q_BxTxHxK: jax.Array, k_BxTxGxK: jax.Array, block: int, rows: np.ndarray,
                 implementation: str) -> jax.Array:
    """distill_target in a layer: under a mesh the fused kernel, opaque to XLA's partitioner,
    runs inside shard_map (sequences over the batch axes, heads over `tensor`), as the
    attention kernels do; the jnp version is partitioned by XLA."""
    def call(q, k):
        return distill_target(q, k, block, rows=rows, implementation=implementation)

    active = parallel.active()
    if implementation == "xla" or active is None:
        return call(q_BxTxHxK, k_BxTxGxK)
    mesh, rules = active
    spec = parallel.logical_to_spec(("batch", None, "heads", None), q_BxTxHxK.shape, rules,
                                    mesh)
    kv_spec = parallel.logical_to_spec(("batch", None, "heads", None), k_BxTxGxK.shape, rules,
                                       mesh)
    return jax.shard_map(call, mesh=mesh, in_specs=(spec, kv_spec),
                         out_specs=P(kv_spec[0], kv_spec[2], None, None),
                         check_vma=False)(q_BxTxHxK, k_BxTxGxK)


def distill_loss(target: jax.Array, log_probs: jax.Array) -> jax.Array:
    """Mean over rows of KL(target || gate); entries with target 0 contribute 0."""
    positive = target > 0
    log_t = jnp.log(jnp.where(positive, target, 1.0))
    terms = jnp.where(positive, target * (log_t - jnp.where(positive, log_probs, 0.0)), 0.0)
    return terms.sum(axis=-1).mean()


def pair_density(mask: jax.Array, block: int) -> jax.Array:
    """Share of causal (query, key) pairs a (..., N, N) block mask computes, averaged over the
    leading dimensions (attention_patterns.pair_density, in jnp for traced masks)."""
    n = mask.shape[-1]
    causal = mask & causal_blocks(n)
    kept = causal.sum(axis=(-2, -1)).astype(jnp.float32)
    diagonal = jnp.diagonal(causal, axis1=-2, axis2=-1).sum(axis=-1).astype(jnp.float32)
    pairs = (kept - diagonal) * block * block + diagonal * block * (block + 1) / 2
    t = n * block
    return jnp.mean(pairs / (t * (t + 1) / 2))


def gated_attention(gate: AttentionGate, q_BxTxHxK: jax.Array, k_BxTxGxK: jax.Array,
                    v_BxTxGxK: jax.Array, section: AttentionPatternConfig, name: str,
                    step: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(attention output B x T x H x k, {attn_gate_loss, attn_density, attn_gate_recall}).

    `step` (the optimizer step) switches from dense to the gate's mask at `dense_until`;
    None (inference) always uses the gate."""
    settings, block = section.gate, section.block
    t, h, g = q_BxTxHxK.shape[1], q_BxTxHxK.shape[2], k_BxTxGxK.shape[2]
    sparse_attention.check_block(t, block, name)
    log_probs = gate.log_probs(q_BxTxHxK, k_BxTxGxK, block)
    mask = block_mask(jax.lax.stop_gradient(log_probs), density=settings.density,
                      threshold=settings.threshold, keep_first=settings.keep_first)
    # The target costs a dense Q K^T per learned layer; a row stride trades gate supervision
    # for speed (the gate's weights are shared by all rows, so a subset still trains them).
    rows = target_rows(log_probs.shape[-1], settings.target_row_stride)
    target = layer_target(q_BxTxHxK, k_BxTxGxK, block, rows,
                          target_implementation(settings.target_kernel))
    if step is not None and settings.dense_until > 0:
        mask = jnp.where(step >= settings.dense_until, mask, causal_blocks(mask.shape[-1]))
    mask_BxHxNxN = jnp.repeat(mask, h // g, axis=1)  # query head h reads group h // (H/G)
    out = sparse_attention.attend_mask(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, mask_BxHxNxN,
                                       section, name)
    aux = {"attn_gate_loss": distill_loss(target, log_probs[..., rows, :]),
           "attn_density": pair_density(mask, block),
           # share of the (pooled) attention mass the used mask covers, on the target's rows
           "attn_gate_recall": jnp.mean(jnp.sum(target * mask[..., rows, :], axis=-1))}
    return out, aux


def is_gate_param(path: tuple) -> bool:
    """Whether a params-tree path is a gate's (layers/{i}/attn/gate/...), not MoE's or the
    MLP's 'gate'."""
    keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
    return any(a == "attn" and b == "gate" for a, b in zip(keys, keys[1:]))
