"""The learned attention gate's distillation target as one Pallas kernel (Triton lowering).

For sequence b, key/value head g and query block i (one of the target `rows`):

  T[b, g, i, j] = max over the group's query heads h, the rows r of block i and the keys c
                  of block j that r sees (c <= r) of exp(S[r, c] - lse_r)

with S = Q K^T * scale and lse_r the dense causal log-sum-exp of row r: the max-pooled
attention map SeerAttention distills its gate from. spjax/model/attention_gate.py
normalizes each row afterwards and holds the plain-jnp version (`distill_target`).

In XLA that map costs a B x H x b x T score block per query block, written to memory and
read back by the softmax and the pooling; at 8k tokens it made a training step 3.5x slower.
Here each program keeps its scores on chip: per query head, one pass over key blocks
0..i for the row statistics (online max and sum, base 2) and a second pass for the tile
maxima, which go into an (N,) vector in registers. Nothing of size T x T leaves the chip.

  grid (R, B, G): one program per target row, sequence and key/value head; it loops over
  the group's query heads, so GQA groups share one map as the gate does.

Off-diagonal tiles are unmasked; the diagonal tile gets the element-wise causal mask. Runs
with `interpret=True` on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.block_sparse_attention.kernel import LOG2E, _causal, _tile

_NT = (((1,), (1,)), ((), ()))  # A B^T


def _target_kernel(rows_ref, q_ref, k_ref, out_ref, *, block, width, group, qk_scale):
    r, b, g = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    i = rows_ref[r]
    columns = jax.lax.broadcasted_iota(jnp.int32, (width,), 0)

    def scores(q, kb, masked):
        k = k_ref[b, _tile(kb, block), g, :]
        s = jax.lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * qk_scale
        return _causal(s, block) if masked else s

    def head(n, best):
        q = q_ref[b, _tile(i, block), g * group + n, :]

        def statistics(kb, carry, masked):  # online row max and sum of exp2
            m, l = carry
            s = scores(q, kb, masked)
            m_new = jnp.maximum(m, jnp.max(s, axis=1))
            return m_new, jnp.exp2(m - m_new) * l + jnp.sum(jnp.exp2(s - m_new[:, None]), 1)

        carry = (jnp.full((block,), -jnp.inf, jnp.float32), jnp.zeros((block,), jnp.float32))
        carry = jax.lax.fori_loop(0, i, lambda kb, c: statistics(kb, c, False), carry)
        m, l = statistics(i, carry, True)
        lse = m + jnp.log2(l)  # every row sees at least its own key: l >= 1

        def tile_max(kb, best, masked):
            top = jnp.max(jnp.exp2(scores(q, kb, masked) - lse[:, None]))
            return jnp.where(columns == kb, jnp.maximum(best, top), best)

        best = jax.lax.fori_loop(0, i, lambda kb, best: tile_max(kb, best, False), best)
        return tile_max(i, best, True)

    out_ref[...] = jax.lax.fori_loop(0, group, head, jnp.zeros((width,), jnp.float32))


def max_pooled_attention(q_BxTxHxK: jax.Array, k_BxTxGxK: jax.Array, block: int,
                         rows: np.ndarray, *, scale: float | None = None,
                         interpret: bool = False, num_warps: int = 4,
                         num_stages: int = 2) -> jax.Array:
    """(B, G, R, N) fp32: the un-normalized max-pooled causal attention map at the query
    block `rows` (see the module docstring). Zero beyond the causal blocks."""
    b, t, h, d = q_BxTxHxK.shape
    g, n = k_BxTxGxK.shape[2], t // block
    rows = np.asarray(rows, np.int32)
    width = 1 << max(0, (n - 1).bit_length())  # Triton vectors have power-of-two lengths
    scale = d ** -0.5 if scale is None else scale
    kernel = functools.partial(_target_kernel, block=block, width=width, group=h // g,
                               qk_scale=scale * LOG2E)
    pooled = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((b, g, len(rows), width), jnp.float32),
        grid=(len(rows), b, g),
        in_specs=[pl.no_block_spec] * 3,
        out_specs=pl.BlockSpec((None, None, None, width), lambda r, bi, gi: (bi, gi, r, 0)),
        interpret=interpret,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        name="attention_gate_target",
    )(jnp.asarray(rows), q_BxTxHxK, k_BxTxGxK)
    return pooled[..., :n]

