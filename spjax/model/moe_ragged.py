"""Expert-parallel dispatch with `jax.lax.ragged_all_to_all`: each device sends each expert
shard exactly the assignments routed to it, instead of a buffer padded to the worst case.

The padded exchange (moe._all_to_all_experts) moves (shards, N k, d) per device each way, so
`shards` times the assignments' own size; this one moves N k rows in all. XLA:CPU does not
implement ragged_all_to_all, so `model.moe.dispatch: ragged` is for GPUs; on CPU the tests
set COLLECTIVE to `emulated_ragged_all_to_all`, which keeps its documented semantics with
all_gather.

Inside shard_map over the `expert` axis, with S shards of L local experts each and the
N k assignments of this device's tokens:

  1. sort the assignments by expert (so by destination shard, and by local expert within);
  2. exchange the (S,) send counts: everyone learns the S x S matrix C[sender, receiver];
  3. ragged_all_to_all the rows and their local expert ids: sender s's rows for receiver r
     land in r's buffer after those of senders 0..s-1, at sum_{s' < s} C[s', r];
  4. the receiver sorts what it got by local expert and runs the grouped GEMMs;
  5. a second ragged_all_to_all returns each result to the slot its row was sent from.

The receive buffer is static, S N k rows (every sender could route everything to one shard),
but only the rows actually routed cross the interconnect.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


# The collective used; None: jax.lax.ragged_all_to_all. Tests on CPU set
# emulated_ragged_all_to_all here.
COLLECTIVE = None


def available() -> bool:
    """Whether the ragged collective can run here (XLA:CPU has none)."""
    return COLLECTIVE is not None or jax.default_backend() != "cpu"


def exchange(x_NxD: jax.Array, experts_NxK: jax.Array, gates_NxK: jax.Array, compute, *,
             axis: str, shards: int, local: int) -> jax.Array:
    """sum_k gate_k * expert_k(x) for this device's tokens, the experts living on the `axis`
    shards. `compute(rows_MxD, expert_M)` runs the local experts on rows whose expert id is
    `local` for padding (it must return zeros there)."""
    a2a = COLLECTIVE or jax.lax.ragged_all_to_all
    n, k = experts_NxK.shape
    flat = experts_NxK.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # by destination shard, then local expert
    token = order // k
    send_x = x_NxD[token]
    send_e = (flat % local)[order]
    send_counts = jnp.zeros((shards,), jnp.int32).at[flat // local].add(1)
    counts = jax.lax.all_gather(send_counts, axis)  # (sender, receiver)
    me = jax.lax.axis_index(axis)
    send_offsets = _exclusive_cumsum(send_counts)
    recv_counts = counts[:, me]
    # where my rows start in each receiver's buffer: after the rows of lower senders
    landing = _exclusive_cumsum(counts, axis=0)[me]
    rows = shards * n * k
    recv_x = a2a(send_x, jnp.zeros((rows, x_NxD.shape[1]), x_NxD.dtype), send_offsets,
                 send_counts, landing, recv_counts, axis_name=axis)
    recv_e = a2a(send_e, jnp.full((rows,), local, jnp.int32), send_offsets, send_counts,
                 landing, recv_counts, axis_name=axis)
    out = compute(recv_x, recv_e)
    # back: the rows from sender s start at sum_{s' < s} C[s', me] here and return to the
    # offset sender s sent them from, its exclusive cumsum of C[s, :] at me
    held_offsets = _exclusive_cumsum(recv_counts)
    return_to = _exclusive_cumsum(counts, axis=1)[:, me]
    back = a2a(out, jnp.zeros((n * k, out.shape[1]), out.dtype), held_offsets, recv_counts,
               return_to, send_counts, axis_name=axis)
    weighted = back * gates_NxK.reshape(-1)[order][:, None].astype(back.dtype)
    return jnp.zeros_like(x_NxD).at[token].add(weighted)


def _exclusive_cumsum(a: jax.Array, axis: int = 0) -> jax.Array:
    return jnp.cumsum(a, axis=axis) - a


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                               recv_sizes, *, axis_name):
    """ragged_all_to_all's documented semantics (one slice per device) from all_gather, for
    XLA:CPU, which lacks the collective: receiver r writes sender s's rows
    operand_s[input_offsets_s[r] + i] at output[output_offsets_s[r] + i], i < send_sizes_s[r].
    `recv_sizes` is implied by the senders' sizes."""
    del recv_sizes
    me = jax.lax.axis_index(axis_name)
    operands = jax.lax.all_gather(operand, axis_name)  # (S, rows, ...)
    starts = jax.lax.all_gather(input_offsets, axis_name)[:, me]
    sizes = jax.lax.all_gather(send_sizes, axis_name)[:, me]
    lands = jax.lax.all_gather(output_offsets, axis_name)[:, me]
    position = jnp.arange(output.shape[0])
    for s in range(operands.shape[0]):
        i = position - lands[s]
        inside = (i >= 0) & (i < sizes[s])
        rows = operands[s][jnp.clip(starts[s] + i, 0, operands.shape[1] - 1)]
        mask = inside.reshape(inside.shape + (1,) * (output.ndim - 1))
        output = jnp.where(mask, rows, output)
    return output
