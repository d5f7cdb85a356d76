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
    "experts": ExpertWeights, "masked_experts": MaskedExpertWeights}


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
        try:
            return cls(d_in, d_out, axes=axes, init_std=self.init_std,
                       param_dtype=self.param_dtype, compute_dtype=self.compute_dtype,
                       out_dtype=out_dtype or self.compute_dtype, rngs=rngs, spec=spec)
        except ConfigError as e:  # structures cannot know their layer's name: add it
            raise ConfigError(f"layer '{name}': {str(e).splitlines()[0]}") from None

    def experts(self, name: str, experts: int, d_in: int, d_out: int, axes: Axes,
                rngs: nnx.Rngs) -> ExpertWeights:
        """An MoE layer's stack of `experts` weights, dense or masked by `assign(name)`.
        Block-sparse specs give a masked stack: the grouped GEMMs have no block-sparse form,
        so block masks are applied to the weights (the tables of the dense layers' kernels
        do not apply here)."""
        spec = self.assign(name)
        kwargs = dict(axes=axes, init_std=self.init_std, param_dtype=self.param_dtype,
                      rngs=rngs)
        if spec.structure == "dense":
            return ExpertWeights(experts, d_in, d_out, **kwargs)
        if spec.structure in ("masked", "blocksparse"):
            return MaskedExpertWeights(experts, d_in, d_out, **kwargs)
        raise ConfigError(f"layer '{name}': expert weights cannot take the low-rank structure "
                          f"'{spec.structure}' yet; leave MoE experts out of lowrank.rules "
                          f"(names like 'layers/0/moe/gate')")
