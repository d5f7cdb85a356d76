"""Expert weight stacks (E x d_in x d_out) of a mixture-of-experts layer, dense or masked.

The MoE layer asks the factory (`LinearFactory.experts`) for each of its three stacks by
name (`layers/3/moe/gate`), so the sparsity rules reach expert weights like any other
linear. A masked stack keeps a bool mask of the stack's shape and axes beside its kernel,
sharded with it over `expert`. The layer then feeds `effective()` into the grouped GEMMs
and the expert-parallel all-to-all unchanged.

The sparsity engine sees an (E, I, O) stack as the I x (E O) matrix of its experts side by
side (`sparsity/engine.py: as_matrix`), so N:M groups run along each expert's input
dimension and b x b blocks stay inside one expert. The low-rank structures with an expert
form (lowrank, sltrain, relora) are in experts_lowrank.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from spjax.model.linear import Axes, normal_init
from spjax.model.variables import PrunedScale, SparsityMask


class ExpertWeights(nnx.Module):
    def __init__(self, experts: int, d_in: int, d_out: int, *, axes: Axes, init_std: float,
                 param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(normal_init(init_std)(rngs.params(), (experts, d_in, d_out),
                                                      param_dtype), axes=axes)

    def effective(self) -> jax.Array:
        return self.kernel[...]


class MaskedExpertWeights(ExpertWeights):
    """W_eff = W * (M + (1 - M) * pruned_scale), straight-through gradient, as MaskedLinear."""

    def __init__(self, experts: int, d_in: int, d_out: int, *, axes: Axes, init_std: float,
                 param_dtype: jnp.dtype, rngs: nnx.Rngs):
        super().__init__(experts, d_in, d_out, axes=axes, init_std=init_std,
                         param_dtype=param_dtype, rngs=rngs)
        self.mask = SparsityMask(jnp.ones((experts, d_in, d_out), bool), axes=axes)
        self.pruned_scale = PrunedScale(jnp.zeros((), jnp.float32), axes=())

    def effective(self) -> jax.Array:
        kernel = self.kernel[...]
        keep = jnp.where(self.mask[...], 1.0, self.pruned_scale[...]).astype(kernel.dtype)
        return kernel + jax.lax.stop_gradient(kernel * keep - kernel)
