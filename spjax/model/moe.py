"""Mixture-of-experts SwiGLU MLP: top-k softmax router, load-balancing and z losses,
dropless grouped GEMMs (or a capacity with token dropping), optional shared expert, and
expert parallelism over the mesh's `expert` axis.

Routing (per token x): p = softmax(x R) over E experts; the top-k experts e_1..e_k get gates
g_i = p_{e_i} / sum_j p_{e_j}. y = sum_i g_i SwiGLU_{e_i}(x) (+ a shared SwiGLU).
Losses, from statistics summed over *all* tokens of the global batch (so every mesh gives the
single-device value):
  load balance (Switch/GShard)  E * sum_e f_e P_e, f_e = share of the N k assignments that go
                                to e, P_e = mean router probability of e
  z-loss (ST-MoE)               mean over tokens of logsumexp(x R)^2

Dropless dispatch sorts the N k assignments by expert and runs three grouped GEMMs
(`jax.lax.ragged_dot`: group sizes are data, shapes are static). With a capacity factor c,
each expert takes at most C = ceil(c N k / E) assignments (top-1 choices of all tokens first,
then top-2, ... as in GShard) into a padded (E, C, d) buffer; the rest are dropped. N is the
tokens of one batch shard (GShard's "group"), so capacity routing is per data shard; config
validation keeps it away from expert parallelism.

Expert parallelism: inside `shard_map` over the whole mesh, each device routes its own tokens,
sends every assignment to the device holding its expert with an all-to-all, runs its local
experts, and returns the results with a second all-to-all. `model.moe.dispatch`: `padded`
(the default, any backend) pads each device's send buffer to the worst case; `ragged` (GPU;
spjax/model/moe_ragged.py) sends only the routed rows with ragged_all_to_all. Expert hidden
units may also be split over the `tensor` axis (partial outputs summed with a psum).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from pallas_kernels.grouped_gemm import grouped_matmul
from pallas_kernels.grouped_gemm import kernel as grouped_gemm_kernel
from spjax import parallel
from spjax.config import ModelConfig
from spjax.errors import ConfigError
from spjax.model import moe_ragged
from spjax.model.linear import normal_init
from spjax.model.structures import LinearFactory

Stats = dict[str, jax.Array]


# ----------------------------------------------------------------------------- routing


def route(x_NxD: jax.Array, router_DxE: jax.Array, top_k: int
          ) -> tuple[jax.Array, jax.Array, Stats]:
    """(gates_NxK fp32, experts_NxK int32, partial sums for the losses over these tokens)."""
    logits_NxE = jnp.dot(x_NxD.astype(jnp.float32), router_DxE.astype(jnp.float32))
    probs_NxE = jax.nn.softmax(logits_NxE, axis=-1)
    top_p, experts = jax.lax.top_k(probs_NxE, top_k)
    gates = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
    num_experts = router_DxE.shape[1]
    counts = jnp.zeros((num_experts,), jnp.float32).at[experts.reshape(-1)].add(1.0)
    stats = {"assignments_E": counts, "probs_E": jnp.sum(probs_NxE, axis=0),
             "z_sum": jnp.sum(jax.nn.logsumexp(logits_NxE, axis=-1) ** 2),
             "tokens": jnp.asarray(x_NxD.shape[0], jnp.float32)}
    return gates, experts.astype(jnp.int32), stats


def losses_from(stats: Stats, top_k: int) -> Stats:
    e = stats["assignments_E"].shape[0]
    n = stats["tokens"]
    load = e * jnp.sum((stats["assignments_E"] / (n * top_k)) * (stats["probs_E"] / n))
    return {"load_balance": load, "z_loss": stats["z_sum"] / n}


# ----------------------------------------------------------------------------- experts


def grouped_swiglu(x_MxD: jax.Array, sizes_G: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                   w_down: jax.Array, implementation: str = "auto",
                   padded: bool = True) -> jax.Array:
    """Rows sorted by group; rows past sum(sizes) (padding) come out exactly zero.
    padded=False promises there are none (sum(sizes) == rows), which saves the zeroing."""
    dt = x_MxD.dtype
    # The Mosaic GPU kernels run on Hopper when this shard's widths fit their tiles (5-30x
    # jax.lax.ragged_dot there, bench/moe.py); ragged_dot runs anywhere (CPU, other GPUs).
    fits = grouped_gemm_kernel.supported(*w_gate.shape[1:]) and dt in (jnp.bfloat16,
                                                                       jnp.float16)
    if implementation == "auto":
        implementation = "pallas" if fits else "ragged_dot"
    elif implementation == "pallas" and not fits:
        d, f = w_gate.shape[1:]
        raise ConfigError(f"model.moe.grouped_gemm=pallas needs a Hopper GPU, bfloat16 compute "
                          f"and expert widths that are multiples of 128 (here d_model {d}, "
                          f"expert width {f} per shard, {jnp.dtype(dt).name}, backend "
                          f"{jax.default_backend()}); use grouped_gemm=auto or ragged_dot")
    mm = lambda a, w: grouped_matmul(a, w.astype(dt), sizes_G, implementation,  # noqa: E731
                                     padded=padded)
    out = mm(jax.nn.silu(mm(x_MxD, w_gate)) * mm(x_MxD, w_up), w_down)
    if not padded:
        return out
    valid = jnp.arange(x_MxD.shape[0]) < jnp.sum(sizes_G)
    return jnp.where(valid[:, None], out, 0)


def dropless(x_NxD, experts_NxK, gates_NxK, w_gate, w_up, w_down,
             implementation: str = "auto") -> jax.Array:
    n, k = experts_NxK.shape
    flat = experts_NxK.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token = order // k
    sizes = jnp.zeros((w_gate.shape[0],), jnp.int32).at[flat].add(1)
    out = grouped_swiglu(x_NxD[token], sizes, w_gate, w_up, w_down, implementation,
                         padded=False)  # every one of the n k rows has an expert
    weighted = out * gates_NxK.reshape(-1)[order][:, None].astype(out.dtype)
    return jnp.zeros_like(x_NxD).at[token].add(weighted)


def with_capacity(x_NxD, experts_NxK, gates_NxK, w_gate, w_up, w_down, capacity: int):
    """GShard-style: assignments take slots in priority order (all top-1 choices first), at
    most `capacity` per expert; the overflow is dropped (contributes nothing)."""
    n, k = experts_NxK.shape
    e = w_gate.shape[0]
    by_priority = experts_NxK.T.reshape(-1)  # [k-major]: top-1 of every token, then top-2, ...
    onehot = jax.nn.one_hot(by_priority, e, dtype=jnp.int32)
    slot = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=1)
    kept = slot < capacity
    token = jnp.tile(jnp.arange(n), k)
    gates = gates_NxK.T.reshape(-1)
    slot = jnp.where(kept, slot, capacity)  # dropped ones land in a discarded extra slot
    buf = jnp.zeros((e, capacity + 1, x_NxD.shape[1]), x_NxD.dtype)
    buf = buf.at[by_priority, slot].set(x_NxD[token])[:, :capacity]
    dt = x_NxD.dtype
    h = jax.nn.silu(jnp.einsum("ecd,edf->ecf", buf, w_gate.astype(dt))) * jnp.einsum(
        "ecd,edf->ecf", buf, w_up.astype(dt))
    out = jnp.einsum("ecf,efd->ecd", h, w_down.astype(dt))
    out = jnp.pad(out, ((0, 0), (0, 1), (0, 0)))  # the discarded slot reads zeros
    picked = out[by_priority, slot] * (gates * kept)[:, None].astype(dt)
    return jnp.zeros_like(x_NxD).at[token].add(picked)


def capacity_for(tokens: int, top_k: int, experts: int, factor: float) -> int:
    return max(1, math.ceil(factor * tokens * top_k / experts))


# ----------------------------------------------------------------------------- expert parallel


def _local_experts(rows_x, rows_e, w_gate, w_up, w_down, *, tensor_axis: str | None,
                   implementation: str) -> jax.Array:
    """This shard's experts on received rows; expert id == local count marks padding, whose
    rows come out zero."""
    local = w_gate.shape[0]
    order = jnp.argsort(rows_e, stable=True)  # padding (id == local) sorts last, outside groups
    sizes = jnp.zeros((local + 1,), jnp.int32).at[rows_e].add(1)[:local]
    out_sorted = grouped_swiglu(rows_x[order], sizes, w_gate, w_up, w_down, implementation)
    out = jnp.zeros_like(rows_x).at[order].set(out_sorted)
    if tensor_axis is not None:  # hidden units split over `tensor`: sum the partial outputs
        out = jax.lax.psum(out, tensor_axis)
    return out


def _all_to_all_experts(x_NxD, experts_NxK, gates_NxK, compute, *, axis: str, shards: int,
                        local: int) -> jax.Array:
    """Inside shard_map: send each assignment to the shard owning its expert, compute, return.

    The send buffer is (shards, N k, d): padded to the worst case of every assignment going to
    one shard, so no token is ever dropped (dropless) and shapes stay static."""
    n, k = experts_NxK.shape
    flat = experts_NxK.reshape(-1)
    dest = flat // local
    onehot = jax.nn.one_hot(dest, shards, dtype=jnp.int32)
    pos = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=1)
    token = jnp.arange(n * k) // k
    send_x = jnp.zeros((shards, n * k, x_NxD.shape[1]), x_NxD.dtype).at[dest, pos].set(
        x_NxD[token])
    send_e = jnp.full((shards, n * k), local, jnp.int32).at[dest, pos].set(flat % local)
    recv_x = jax.lax.all_to_all(send_x, axis, 0, 0, tiled=False)
    recv_e = jax.lax.all_to_all(send_e, axis, 0, 0, tiled=False)
    out = compute(recv_x.reshape(-1, x_NxD.shape[1]), recv_e.reshape(-1))
    back = jax.lax.all_to_all(out.reshape(shards, n * k, -1), axis, 0, 0, tiled=False)
    picked = back[dest, pos] * gates_NxK.reshape(-1)[:, None].astype(back.dtype)
    return jnp.zeros_like(x_NxD).at[token].add(picked)


# ----------------------------------------------------------------------------- the layer


class MoE(nnx.Module):
    def __init__(self, name: str, config: ModelConfig, linear: LinearFactory, rngs: nnx.Rngs):
        moe = config.moe
        d, f, e = config.d_model, moe.d_expert or config.d_ff, moe.num_experts
        dt = jnp.dtype(config.param_dtype)
        init = normal_init(config.init_std)
        self.moe = moe
        self.compute_dtype = jnp.dtype(config.compute_dtype)
        self.gemm = moe.grouped_gemm  # resolved per call: see grouped_swiglu
        self.router = nnx.Param(init(rngs.params(), (d, e), dt), axes=("embed", None))
        # expert stacks through the factory: sparsity rules reach them like any linear
        self.gate = linear.experts(f"{name}/gate", e, d, f, ("experts", "embed", "mlp"), rngs)
        self.up = linear.experts(f"{name}/up", e, d, f, ("experts", "embed", "mlp"), rngs)
        self.down = linear.experts(f"{name}/down", e, f, d, ("experts", "mlp", "embed"), rngs)
        if moe.shared_expert:
            self.shared_gate = nnx.Param(init(rngs.params(), (d, f), dt), axes=("embed", "mlp"))
            self.shared_up = nnx.Param(init(rngs.params(), (d, f), dt), axes=("embed", "mlp"))
            self.shared_down = nnx.Param(init(rngs.params(), (f, d), dt), axes=("mlp", "embed"))

    def __call__(self, x_BxTxD: jax.Array) -> tuple[jax.Array, Stats]:
        b, t, d = x_BxTxD.shape
        x_NxD = x_BxTxD.reshape(b * t, d).astype(self.compute_dtype)
        weights = (self.router[...], self.gate.effective(), self.up.effective(),
                   self.down.effective())
        active = parallel.active()
        if active is None:
            y, stats = self._local(x_NxD, *weights)
        else:
            y, stats = self._sharded(active, x_NxD, *weights)
        if self.moe.shared_expert:
            c = self.compute_dtype
            gate = x_NxD @ self.shared_gate[...].astype(c)
            y = y + (jax.nn.silu(gate) * (x_NxD @ self.shared_up[...].astype(c))) @ \
                self.shared_down[...].astype(c)
        return y.reshape(b, t, d), losses_from(stats, self.moe.top_k)

    def _local(self, x_NxD, router, w_gate, w_up, w_down):
        gates, experts, stats = route(x_NxD, router, self.moe.top_k)
        if self.moe.capacity_factor > 0:
            capacity = capacity_for(x_NxD.shape[0], self.moe.top_k, w_gate.shape[0],
                                    self.moe.capacity_factor)
            y = with_capacity(x_NxD, experts, gates, w_gate, w_up, w_down, capacity)
        else:
            y = dropless(x_NxD, experts, gates, w_gate, w_up, w_down, self.gemm)
        return y, stats

    def _sharded(self, active: tuple[Any, Any], x_NxD, router, w_gate, w_up, w_down):
        """shard_map over the whole mesh: tokens over the batch axes, experts over `expert`,
        expert hidden units over `tensor`; loss statistics summed over the batch axes."""
        mesh, rules = active
        if self.moe.dispatch == "ragged" and not moe_ragged.available():
            raise ConfigError("model.moe.dispatch=ragged needs a GPU: XLA:CPU has no "
                              "ragged_all_to_all; use model.moe.dispatch=padded here")
        token_axes = parallel.batch_sharding(mesh, rules).spec[0]
        token_axes = (token_axes,) if isinstance(token_axes, str) else tuple(token_axes or ())
        ep = mesh.shape["expert"]
        tp = "tensor" if mesh.shape["tensor"] > 1 else None
        expert_spec = P("expert" if ep > 1 else None, None, tp)
        down_spec = P("expert" if ep > 1 else None, tp, None)
        rows = P(token_axes or None, None)

        def body(x, router, w_gate, w_up, w_down):
            if ep > 1:
                gates, experts, stats = route(x, router, self.moe.top_k)
                exchange = (moe_ragged.exchange if self.moe.dispatch == "ragged"
                            else _all_to_all_experts)
                y = exchange(x, experts, gates, lambda rows_x, rows_e: _local_experts(
                    rows_x, rows_e, w_gate, w_up, w_down, tensor_axis=tp,
                    implementation=self.gemm), axis="expert", shards=ep, local=w_gate.shape[0])
            else:
                y, stats = self._local(x, router, w_gate, w_up, w_down)
                if tp is not None:
                    y = jax.lax.psum(y, tp)
            if token_axes:
                stats = jax.lax.psum(stats, token_axes)
            return y, stats

        stats_spec = {"assignments_E": P(), "probs_E": P(), "z_sum": P(), "tokens": P()}
        return jax.shard_map(body, mesh=mesh, in_specs=(rows, P(), expert_spec, expert_spec,
                                                        down_spec),
                             out_specs=(rows, stats_spec), check_vma=False)(
            x_NxD, router, w_gate, w_up, w_down)
