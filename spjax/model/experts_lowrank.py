"""Low-rank expert stacks: the `lowrank`, `sltrain` and `relora` structures of model/lowrank.py
for an MoE layer's (E, d_in, d_out) stack, one factorization per expert.

    lowrank  W_e = (alpha/r) A_e B_e
    sltrain  W_e = (alpha/r) A_e B_e + S_e   (each expert its own random support, drawn once)
    relora   W_e = W0_e + (alpha/r) A_e B_e  (W0 frozen; the engine merges every T steps)

Factors and supports are stacked over experts and carry the `experts` axis, so expert
parallelism shards them with the kernels they replace. `effective()` materializes the dense
stack, which the grouped GEMMs and the expert-parallel exchange take unchanged. Why not two
grouped GEMMs through the factors: the stack is rebuilt once per step for all tokens (E d_in r
d_out multiply-adds, small next to the tokens' GEMMs at the presets), and SLTrain's own kernel
materializes W the same way. What stays low-rank is what the method is for: the trained
parameters and their optimizer state. LOST and SST have no expert form (their SVD-based init
and per-step spectral selection are per matrix); asking for one is a start-up error.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from spjax.model.experts import ExpertWeights
from spjax.model.linear import Axes, LinearSpec, normal_init
from spjax.model.lowrank import _check_alpha, _check_rank, kaiming_uniform, sltrain_nnz
from spjax.model.variables import FrozenKernel, SparseIndex


def _factors(module: nnx.Module, kind: str, experts: int, d_in: int, d_out: int, axes: Axes,
             spec: LinearSpec, param_dtype: jnp.dtype, rngs: nnx.Rngs, b_zero: bool) -> None:
    """A (E, d_in, r) kaiming-uniform and B (E, r, d_out), zero or kaiming-uniform, as the
    2-D structures; `scale` = alpha / r."""
    r = _check_rank(kind, d_in, d_out, spec.rank)
    module.scale = _check_alpha(kind, d_in, d_out, spec.alpha) / r
    module.a = nnx.Param(kaiming_uniform(rngs.params(), (experts, d_in, r), d_in, param_dtype),
                         axes=(axes[0], axes[1], "rank"))
    b = (jnp.zeros((experts, r, d_out), param_dtype) if b_zero
         else kaiming_uniform(rngs.params(), (experts, r, d_out), r, param_dtype))
    module.b = nnx.Param(b, axes=(axes[0], "rank", axes[2]))


def _product(module: nnx.Module) -> jax.Array:
    """(alpha/r) A_e B_e for every expert, in the factors' dtype with fp32 accumulation."""
    a = module.a[...]
    return jnp.einsum("eir,ero->eio", a * module.scale, module.b[...],
                      preferred_element_type=jnp.float32).astype(a.dtype)


class LowRankExpertWeights(ExpertWeights):
    """W_e = (alpha/r) A_e B_e; both factors kaiming-uniform, as LowRankLinear."""

    def __init__(self, experts: int, d_in: int, d_out: int, *, axes: Axes, init_std: float,
                 param_dtype: jnp.dtype, rngs: nnx.Rngs, spec: LinearSpec):
        del init_std  # the factors' init is fixed by their fan-in
        _factors(self, "lowrank", experts, d_in, d_out, axes, spec, param_dtype, rngs,
                 b_zero=False)

    def effective(self) -> jax.Array:
        return _product(self)


class SLTrainExpertWeights(ExpertWeights):
    """W_e = (alpha/r) A_e B_e + S_e. Per expert, S_e is `values[e]` at the sorted flat
    positions `index[e]` of its own uniform random support (nnz = floor(delta d_in d_out)),
    never a dense S. Init as SLTrainLinear: B = 0, A and the values U(+-1/sqrt(d_in))."""

    def __init__(self, experts: int, d_in: int, d_out: int, *, axes: Axes, init_std: float,
                 param_dtype: jnp.dtype, rngs: nnx.Rngs, spec: LinearSpec):
        del init_std
        nnz = sltrain_nnz(d_in, d_out, spec.density)  # per expert
        _factors(self, "sltrain", experts, d_in, d_out, axes, spec, param_dtype, rngs,
                 b_zero=True)
        self.shape = (d_in, d_out)
        keys = jax.random.split(rngs.params(), experts)
        support = jax.vmap(lambda k: jnp.sort(jax.random.permutation(k, d_in * d_out)[:nnz]))
        self.index = SparseIndex(support(keys).astype(jnp.int32), axes=(axes[0], None))
        self.values = nnx.Param(kaiming_uniform(rngs.params(), (experts, nnz), d_in,
                                                param_dtype), axes=(axes[0], None))

    def effective(self) -> jax.Array:
        low = _product(self)
        add = lambda w_IxO, idx, v: w_IxO.reshape(-1).at[idx].add(v).reshape(self.shape)  # noqa
        return jax.vmap(add)(low, self.index[...], self.values[...].astype(low.dtype))


class ReLoRAExpertWeights(ExpertWeights):
    """W_e = W0_e + (alpha/r) A_e B_e, W0 frozen (N(0, init_std)), A kaiming-uniform, B = 0:
    the stack starts as the dense init. The engine's merges run per expert."""

    def __init__(self, experts: int, d_in: int, d_out: int, *, axes: Axes, init_std: float,
                 param_dtype: jnp.dtype, rngs: nnx.Rngs, spec: LinearSpec):
        _factors(self, "relora", experts, d_in, d_out, axes, spec, param_dtype, rngs,
                 b_zero=True)
        self.w0 = FrozenKernel(normal_init(init_std)(rngs.params(), (experts, d_in, d_out),
                                                     param_dtype), axes=axes)

    def effective(self) -> jax.Array:
        return jax.lax.stop_gradient(self.w0[...]) + _product(self)


# LinearSpec.structure -> expert stack class; the structures with no expert form are refused
LOWRANK_EXPERTS: dict[str, type[ExpertWeights]] = {
    "lowrank": LowRankExpertWeights, "sltrain": SLTrainExpertWeights,
    "relora": ReLoRAExpertWeights}
