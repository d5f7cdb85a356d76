"""The train state pytree and how it is created, sharded from the start.

`TrainState` holds only arrays (pure nested dicts), so jit, donation, optax and orbax all see
plain pytrees. The model's static structure (its `nnx.GraphDef`) lives outside, in `ModelDef`,
and the step merges it back with `nnx.merge(graphdef, params, structure)`.

- `params`: every `nnx.Param` (trainable; the optimizer sees exactly these);
- `structure`: every other variable (sparsity masks, index tables...), not differentiated;
- `rng`: raw uint32 key data, so checkpoints store a plain array;
- `accounting`: running means of non-zero parameters and FLOPs per token.

`Program` bundles everything static the pure steps are built from (model graph, optimizer,
schedule, sparsity engine, accounting), derived once from the config.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from spjax import parallel
from spjax.config import Config, ModelConfig
from spjax.model.linear import LinearSpec
from spjax.model.structures import dense_everywhere
from spjax.model.transformer import Transformer
from spjax.rules import Rules
from spjax.train.accounting import Accounting
from spjax.sparsity.engine import SparsityEngine, layer_assignment
from spjax.errors import ConfigError
from spjax.lowrank.engine import (LowRankEngine, check_galore_targets, galore_targets,
                                  lowrank_assignment)
from spjax.model.attention_gate import is_gate_param
from spjax.train.optimizer import GaLoreSettings, build_optimizer, lr_schedule, train_only


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    step: jax.Array  # int32 scalar: number of optimizer updates applied
    params: Any
    structure: Any
    opt_state: Any
    rng: jax.Array  # uint32 key data
    accounting: Any  # {"avg_nonzero_params", "avg_flops_per_token"}: running means


@dataclasses.dataclass(frozen=True)
class ModelDef:
    """A model's static graph and the abstract (shape-only) states of its variables."""

    config: ModelConfig
    assign: Callable[[str], LinearSpec]  # per-layer structure (sparsity rules)
    graphdef: nnx.GraphDef
    abstract_params: nnx.State  # carries each variable's `axes` metadata
    abstract_structure: nnx.State

    @classmethod
    def build(cls, config: ModelConfig,
              assign: Callable[[str], LinearSpec] = dense_everywhere) -> ModelDef:
        try:
            abstract = nnx.eval_shape(lambda: Transformer(config, nnx.Rngs(0), assign))
        except ConfigError as e:  # raised inside a JAX transformation, which appends a note
            raise ConfigError(str(e).splitlines()[0]) from None
        graphdef, params, structure = nnx.split(abstract, nnx.Param, ...)
        return cls(config, assign, graphdef, params, structure)

    def create(self, seed: int) -> Transformer:
        return Transformer(self.config, nnx.Rngs(params=seed), self.assign)

    def merge(self, params: Any, structure: Any) -> Transformer:
        return nnx.merge(self.graphdef, params, structure)

    def param_count(self) -> int:
        return sum(x.size for x in jax.tree.leaves(self.abstract_params))


@dataclasses.dataclass(frozen=True)
class Program:
    """Everything static that the pure train and eval steps are built from."""

    model_def: ModelDef
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    sparsity: SparsityEngine | None
    lowrank: LowRankEngine | None
    accounting: Accounting
    trainable: str = "all"  # train.trainable: 'gate' trains only the attention gates

    @classmethod
    def build(cls, config: Config) -> Program:
        assign = combined_assignment(layer_assignment(config.sparsity,
                                                      config.model.compute_dtype),
                                     lowrank_assignment(config.lowrank, config.model))
        model_def = ModelDef.build(config.model, assign)
        steps = config.train.steps
        sparsity = SparsityEngine.build(config.sparsity,
                                        nnx.to_pure_dict(model_def.abstract_structure), steps)
        lowrank = LowRankEngine.build(config.lowrank, config.model,
                                      nnx.to_pure_dict(model_def.abstract_params), steps)
        accounting = Accounting.build(config.model, config.data.seq_len,
                                      model_def.param_count(), sparsity)
        factor = lowrank.lr_factor if lowrank is not None else None
        galore = None
        if config.lowrank.method == "galore":
            check_galore_targets(config.lowrank, nnx.to_pure_dict(model_def.abstract_params))
            rank, _ = config.lowrank.resolved_rank_alpha(config.model.name, config.model.d_model)
            galore = GaLoreSettings(rank, config.lowrank.galore.update_every,
                                    config.lowrank.galore.scale, galore_targets(config.lowrank))
        optimizer = build_optimizer(config.optimizer, steps, factor, galore)
        if config.train.trainable == "gate":
            optimizer = train_only(optimizer, is_gate_param)
        return cls(model_def, optimizer, lr_schedule(config.optimizer, steps, factor), sparsity,
                   lowrank, accounting, config.train.trainable)


def combined_assignment(*assigns: Callable[[str], LinearSpec]) -> Callable[[str], LinearSpec]:
    """One structure per layer: the non-dense one among the rule sets; two is an error."""

    def assign(name: str) -> LinearSpec:
        specs = [spec for spec in (a(name) for a in assigns) if spec.structure != "dense"]
        if len(specs) > 1:
            raise ConfigError(f"layer '{name}' is both {specs[0].structure} and "
                              f"{specs[1].structure} (sparsity.rules / lowrank.rules); mark it "
                              f"dense in one of them")
        return specs[0] if specs else LinearSpec()

    return assign


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """Shardings of every part of the train state, derived once from the rules."""

    mesh: Mesh
    rules: Rules
    state: TrainState  # a TrainState whose leaves are NamedShardings
    abstract: TrainState  # a TrainState of ShapeDtypeStructs carrying those shardings


def _fresh_state(program: Program, seed: int) -> TrainState:
    """The initial state; runs eagerly or under eval_shape (never jitted whole: see below)."""
    _, params, structure = nnx.split(program.model_def.create(seed), nnx.Param, ...)
    params, structure = nnx.to_pure_dict(params), nnx.to_pure_dict(structure)
    key = jax.random.key(seed)
    if program.sparsity is not None:
        params, structure = program.sparsity.init(params, structure, jax.random.fold_in(key, 2))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, structure=structure,
                      opt_state=program.optimizer.init(params),
                      rng=jax.random.key_data(jax.random.fold_in(key, 1)),
                      accounting=program.accounting.initial_state(structure))


def state_layout(program: Program, mesh: Mesh, rules: Rules) -> StateLayout:
    model_def = program.model_def
    abstract = jax.eval_shape(lambda: _fresh_state(program, 0))
    params = parallel.variable_shardings(model_def.abstract_params, mesh, rules)
    structure = parallel.variable_shardings(model_def.abstract_structure, mesh, rules)
    replicated = NamedSharding(mesh, P())
    shardings = TrainState(
        step=replicated, params=params, structure=structure,
        opt_state=parallel.like_params_shardings(abstract.opt_state, abstract.params, params,
                                                 mesh),
        rng=replicated, accounting=jax.tree.map(lambda _: replicated, abstract.accounting))
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return StateLayout(mesh, rules, shardings, abstract)


def init_state(program: Program, layout: StateLayout, seed: int) -> TrainState:
    """Initializes the model and places every array in its sharded layout.

    Parameters are drawn eagerly, one small kernel per tensor, then moved to their shardings:
    a single jit over the whole initializer compiles for minutes on GPU at 350M (XLA's slow
    compile alarm fires). Values do not depend on the mesh, so sharded and single-device runs
    start identical. The cost is one full copy of the parameters on one device at start-up.
    """
    _, params, structure = nnx.split(program.model_def.create(seed), nnx.Param, ...)
    params = jax.device_put(nnx.to_pure_dict(params), layout.state.params)
    structure = jax.device_put(nnx.to_pure_dict(structure), layout.state.structure)
    key = jax.random.key(seed)
    if program.sparsity is not None:  # layer by layer, each layer's init jitted (see init)
        with parallel.activate(layout.mesh, layout.rules):
            params, structure = program.sparsity.init(params, structure,
                                                      jax.random.fold_in(key, 2))
        params = jax.device_put(params, layout.state.params)
        structure = jax.device_put(structure, layout.state.structure)
    opt_state = jax.jit(program.optimizer.init, out_shardings=layout.state.opt_state)(params)
    rng = jax.random.key_data(jax.random.fold_in(key, 1))
    put = jax.device_put
    return TrainState(step=put(jnp.zeros((), jnp.int32), layout.state.step),
                      params=params, structure=structure, opt_state=opt_state,
                      rng=put(rng, layout.state.rng),
                      accounting=put(program.accounting.initial_state(structure),
                                     layout.state.accounting))
