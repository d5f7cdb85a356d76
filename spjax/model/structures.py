"""The registry of weight structures and the one `LinearFactory` built on it.

Every linear layer of the model is built here: `assign(name)` (from the sparsity and
low-rank rules) gives its `LinearSpec`, whose `structure` names a class of STRUCTURES.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax.numpy as jnp
from flax import nnx

from spjax.errors import ConfigError
from spjax.model.blocksparse import BlockSparseLinear
from spjax.model.experts import ExpertWeights, MaskedExpertWeights
from spjax.model.experts_lowrank import (LOWRANK_EXPERTS, LowRankExpertWeights,
                                         ReLoRAExpertWeights, SLTrainExpertWeights)
from spjax.model.linear import Axes, DenseLinear, LinearSpec, MaskedLinear
from spjax.model.lowrank import (LOSTLinear, LowRankLinear, ReLoRALinear, SLTrainLinear,
                                 SSTLinear)

# LinearSpec.structure -> module class (one class per name: accounting maps classes back)
STRUCTURES: dict[str, type[nnx.Module]] = {
    "dense": DenseLinear, "masked": MaskedLinear, "blocksparse": BlockSparseLinear,
    "lowrank": LowRankLinear,
    "sltrain": SLTrainLinear, "relora": ReLoRALinear, "lost": LOSTLinear, "sst": SSTLinear}


# the MoE expert stacks' classes, named for reports (memory per structure)
EXPERT_STRUCTURES: dict[str, type[nnx.Module]] = {
    "experts": ExpertWeights, "masked_experts": MaskedExpertWeights,
    "lowrank_experts": LowRankExpertWeights, "sltrain_experts": SLTrainExpertWeights,
    "relora_experts": ReLoRAExpertWeights}


def dense_everywhere(name: str) -> LinearSpec:
    del name
    return LinearSpec()


@dataclasses.dataclass(frozen=True)
class LinearFactory:
    """Builds each named linear layer with the structure `assign(name)` gives it."""

    assign: Callable[[str], LinearSpec]
    init_std: float
    param_dtype: jnp.dtype
    compute_dtype: jnp.dtype

    def __call__(self, name: str, d_in: int, d_out: int, axes: Axes, rngs: nnx.Rngs,
                 out_dtype: jnp.dtype | None = None) -> nnx.Module:
        spec = self.assign(name)
        cls = STRUCTURES[spec.structure]
        return _named(name, lambda: cls(
            d_in, d_out, axes=axes, init_std=self.init_std, param_dtype=self.param_dtype,
            compute_dtype=self.compute_dtype, out_dtype=out_dtype or self.compute_dtype,
            rngs=rngs, spec=spec))

    def experts(self, name: str, experts: int, d_in: int, d_out: int, axes: Axes,
                rngs: nnx.Rngs) -> ExpertWeights:
        """An MoE layer's stack of `experts` weights: dense, masked, or one of the low-rank
        structures with an expert form (experts_lowrank.py), by `assign(name)`. Block-sparse
        specs give a masked stack: the grouped GEMMs have no block-sparse form, so block masks
        are applied to the weights (the tables of the dense layers' kernels do not apply)."""
        spec = self.assign(name)
        kwargs = dict(axes=axes, init_std=self.init_std, param_dtype=self.param_dtype,
                      rngs=rngs)
        if spec.structure == "dense":
            return ExpertWeights(experts, d_in, d_out, **kwargs)
        if spec.structure in ("masked", "blocksparse"):
            return MaskedExpertWeights(experts, d_in, d_out, **kwargs)
        if spec.structure not in LOWRANK_EXPERTS:
            raise ConfigError(f"layer '{name}': expert weights have no '{spec.structure}' form "
                              f"(experts take {', '.join(LOWRANK_EXPERTS)}); leave MoE experts "
                              f"out of lowrank.rules (names like 'layers/0/moe/gate')")
        cls = LOWRANK_EXPERTS[spec.structure]
        return _named(name, lambda: cls(experts, d_in, d_out, spec=spec, **kwargs))


def _named(name: str, build: Callable[[], nnx.Module]) -> nnx.Module:
    """build(), its ConfigError prefixed with the layer's name (structures cannot know it)."""
    try:
        return build()
    except ConfigError as e:
        raise ConfigError(f"layer '{name}': {str(e).splitlines()[0]}") from None
