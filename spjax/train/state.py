"""The train state pytree and how it is created, sharded from the start.

`TrainState` holds only arrays (pure nested dicts), so jit, donation, optax and orbax all see
plain pytrees. The model's static structure (its `nnx.GraphDef`) lives outside, in `ModelDef`,
and the step merges it back with `nnx.merge(graphdef, params, structure)`.

- `params`: every `nnx.Param` (trainable; the optimizer sees exactly these);
- `structure`: every other variable (sparsity masks, index tables...), not differentiated;
- `rng`: raw uint32 key data, so checkpoints store a plain array.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from spjax import parallel
from spjax.config import ModelConfig
from spjax.model.transformer import Transformer
from spjax.rules import Rules


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    step: jax.Array  # int32 scalar: number of optimizer updates applied
    params: Any
    structure: Any
    opt_state: Any
    rng: jax.Array  # uint32 key data


@dataclasses.dataclass(frozen=True)
class ModelDef:
    """A model's static graph and the abstract (shape-only) states of its variables."""

    config: ModelConfig
    graphdef: nnx.GraphDef
    abstract_params: nnx.State  # carries each variable's `axes` metadata
    abstract_structure: nnx.State

    @classmethod
    def build(cls, config: ModelConfig) -> ModelDef:
        abstract = nnx.eval_shape(lambda: Transformer(config, nnx.Rngs(0)))
        graphdef, params, structure = nnx.split(abstract, nnx.Param, ...)
        return cls(config, graphdef, params, structure)

    def merge(self, params: Any, structure: Any) -> Transformer:
        return nnx.merge(self.graphdef, params, structure)

    def param_count(self) -> int:
        return sum(x.size for x in jax.tree.leaves(self.abstract_params))


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """Shardings of every part of the train state, derived once from the rules."""

    mesh: Mesh
    rules: Rules
    state: TrainState  # a TrainState whose leaves are NamedShardings
    abstract: TrainState  # a TrainState of ShapeDtypeStructs carrying those shardings


def _abstract_state(model_def: ModelDef, optimizer: optax.GradientTransformation) -> TrainState:
    def init() -> TrainState:
        model = Transformer(model_def.config, nnx.Rngs(params=0))
        _, params, structure = nnx.split(model, nnx.Param, ...)
        params, structure = nnx.to_pure_dict(params), nnx.to_pure_dict(structure)
        rng = jax.random.key_data(jax.random.key(0))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, structure=structure,
                          opt_state=optimizer.init(params), rng=rng)

    return jax.eval_shape(init)


def state_layout(model_def: ModelDef, optimizer: optax.GradientTransformation, mesh: Mesh,
                 rules: Rules) -> StateLayout:
    abstract = _abstract_state(model_def, optimizer)
    params = parallel.variable_shardings(model_def.abstract_params, mesh, rules)
    structure = parallel.variable_shardings(model_def.abstract_structure, mesh, rules)
    replicated = NamedSharding(mesh, P())
    shardings = TrainState(
        step=replicated, params=params, structure=structure,
        opt_state=parallel.like_params_shardings(abstract.opt_state, abstract.params, params,
                                                 mesh),
        rng=replicated)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return StateLayout(mesh, rules, shardings, abstract)


def init_state(model_def: ModelDef, optimizer: optax.GradientTransformation,
               layout: StateLayout, seed: int) -> TrainState:
    """Initializes the model and places every array in its sharded layout.

    Parameters are drawn eagerly, one small kernel per tensor, then moved to their shardings:
    a single jit over the whole initializer compiles for minutes on GPU at 350M (XLA's slow
    compile alarm fires). Values do not depend on the mesh, so sharded and single-device runs
    start identical. The cost is one full copy of the parameters on one device at start-up.
    """
    model = Transformer(model_def.config, nnx.Rngs(params=seed))
    _, params, structure = nnx.split(model, nnx.Param, ...)
    params = jax.device_put(nnx.to_pure_dict(params), layout.state.params)
    structure = jax.device_put(nnx.to_pure_dict(structure), layout.state.structure)
    del model
    opt_state = jax.jit(optimizer.init, out_shardings=layout.state.opt_state)(params)
    rng = jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1))
    return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), layout.state.step),
                      params=params, structure=structure, opt_state=opt_state,
                      rng=jax.device_put(rng, layout.state.rng))
