"""The low-rank engine: per-layer structure assignment, and the periodic work of the
structure methods inside the pure train step.

  relora    every `merge_every` steps: W0 += (alpha/r) A B, A re-initialized, B = 0, the
            factors' optimizer moments zeroed; the learning rate re-warms (jagged schedule)
  refactor  (lowrank, sltrain) every `every` steps: balanced refactorization of (A, B),
            moments zeroed, learning rate re-warmed
  sst       every step: SST's gradients (selected singular-vector pairs only, all singular
            values); after the update, unit-norm vectors; every `resample_every` steps a new
            selection (moments of pairs whose selection changed zeroed); every
            `reorth_every` steps a re-SVD (all vector moments zeroed)

Layer functions live in model/lowrank.py; this module only schedules them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from spjax.config import ModelConfig
from spjax.errors import ConfigError
from spjax.config.lowrank import LowRankConfig
from spjax.model import lowrank as layers_lib
from spjax.model.linear import LinearSpec
from spjax.rules import Rules
from spjax.tree import get_path, set_path
from spjax.tree import zero_moments


def lowrank_rules(config: LowRankConfig) -> Rules:
    return Rules.from_pairs(config.rules, source="lowrank.rules")


def lowrank_assignment(config: LowRankConfig, model: ModelConfig
                       ) -> Callable[[str], LinearSpec]:
    """Linear-factory assignment for structure methods (GaLore keeps dense layers)."""
    if not config.is_structure:
        return lambda name: LinearSpec()
    rules = lowrank_rules(config)
    rank, alpha = config.resolved_rank_alpha(model.name, model.d_model)
    spec = LinearSpec(config.method, rank, alpha, config.density)
    return lambda name: spec if rules.lookup(name, "dense") == "lowrank" else LinearSpec()


def galore_targets(config: LowRankConfig) -> Callable[[tuple, jax.Array], bool]:
    """GaLore projects the kernels of the layers the rules mark 'lowrank'."""
    rules = lowrank_rules(config)

    def is_target(path: tuple, leaf: jax.Array) -> bool:
        module, leaf_name = _split_path(path)
        return (leaf_name == "kernel" and leaf.ndim == 2
                and rules.lookup(module, "dense") == "lowrank")

    return is_target


def check_galore_targets(config: LowRankConfig, abstract_params: Any) -> None:
    """GaLore's projection is defined on matrices: an MoE expert stack (E, d_in, d_out) that
    the rules mark is an error at start-up, never silently left to plain Adam."""
    rules = lowrank_rules(config)
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
        name, leaf_name = _split_path(path)
        if leaf_name == "kernel" and leaf.ndim == 3 and rules.lookup(name, "dense") == "lowrank":
            raise ConfigError(f"lowrank.rules mark the expert stack '{name}' for GaLore, whose "
                              f"projection is defined on matrices; leave MoE experts out of "
                              f"lowrank.rules (they then train with plain Adam)")


def _split_path(path: tuple) -> tuple[str, str]:
    """A tree path -> (module name like 'layers/0/mlp/up', leaf name like 'kernel')."""
    keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
    return "/".join(keys[:-1]), keys[-1]


@dataclasses.dataclass(frozen=True)
class LowRankLayer:
    name: str
    path: tuple[Any, ...]
    rank: int
    scale: float  # alpha / r


@dataclasses.dataclass(frozen=True)
class LowRankEngine:
    config: LowRankConfig
    layers: tuple[LowRankLayer, ...]
    total_steps: int

    @classmethod
    def build(cls, config: LowRankConfig, model: ModelConfig, abstract_params: Any,
              total_steps: int) -> LowRankEngine | None:
        """None unless a structure method has periodic work (relora, refactor, sst)."""
        busy = config.method in ("relora", "sst") or config.refactor.every > 0
        if not (config.is_structure and busy):
            return None
        rank, alpha = config.resolved_rank_alpha(model.name, model.d_model)
        factor_keys = {"u", "s", "v"} if config.method == "sst" else {"a", "b"}
        layers = tuple(LowRankLayer("/".join(map(str, p)), p, rank, alpha / rank)
                       for p in _find_modules(abstract_params, factor_keys))
        if not layers:
            raise ConfigError("lowrank.rules mark no linear layer 'lowrank'; check the regexes "
                              "against names like 'layers/0/mlp/up'")
        return cls(config, layers, total_steps)

    # ------------------------------------------------------------------ schedules

    def _period(self) -> tuple[int, int]:
        """(period, re-warm steps) of the jagged learning rate, or (0, 0)."""
        if self.config.method == "relora":
            return self.config.relora.merge_every, self.config.relora.rewarm_steps
        if self.config.refactor.every:
            return self.config.refactor.every, self.config.refactor.rewarm_steps
        return 0, 0

    def lr_factor(self, count: jax.Array) -> jax.Array:
        """Multiplier of the learning rate for update `count` (0-based): after each merge or
        refactorization, a linear re-warm-up over `rewarm_steps` updates."""
        period, rewarm = self._period()
        if not period or not rewarm:
            return jnp.ones((), jnp.float32)
        since = count - (count // period) * period
        ramp = jnp.minimum(1.0, (since + 1) / rewarm)
        return jnp.where(count >= period, ramp, 1.0).astype(jnp.float32)

    # ------------------------------------------------------------------ step hooks

    def optimizer_grads(self, t: jax.Array, grads: Any, params: Any, structure: Any) -> Any:
        if self.config.method != "sst":
            return grads
        for layer in self.layers:
            p, g = get_path(params, layer.path), get_path(grads, layer.path)
            selection = get_path(structure, layer.path)["selection"]
            gu, gs, gv = layers_lib.sst_enhanced_grads(g["u"], g["s"], g["v"], p["s"], selection)
            grads = set_path(grads, layer.path, {**g, "u": gu, "s": gs, "v": gv})
        return grads

    def update(self, t: jax.Array, params: Any, structure: Any, opt_state: Any, grads: Any,
               key: jax.Array) -> tuple[Any, Any, Any]:
        del grads
        if self.config.method == "relora":
            return self._every(t, self.config.relora.merge_every, self._merge, key,
                               (params, structure, opt_state))
        if self.config.method == "sst":
            return self._sst(t, params, structure, opt_state, key)
        return self._every(t, self.config.refactor.every, self._refactor, key,
                           (params, structure, opt_state))

    def _every(self, t: jax.Array, period: int, work: Callable, key: jax.Array,
               operands: tuple[Any, Any, Any]) -> tuple[Any, Any, Any]:
        due = (t % period == 0) & (t < self.total_steps)
        return jax.lax.cond(due, lambda ops: work(*ops, key), lambda ops: ops, operands)

    def _reset(self, params: Any, leaves: dict[tuple[Any, ...], Any]) -> Any:
        """A params-shaped reset tree: False everywhere but the given leaves."""
        reset = jax.tree.map(lambda _: jnp.zeros((), bool), params)
        for path, value in leaves.items():
            reset = set_path(reset, path, value)
        return reset

    def _merge(self, params: Any, structure: Any, opt_state: Any, key: jax.Array):
        cleared = {}
        for i, layer in enumerate(self.layers):
            p = get_path(params, layer.path)
            w0 = get_path(structure, layer.path)["w0"]
            layer_key = jax.random.fold_in(key, i)
            if p["a"].ndim == 3:  # an expert stack: each expert its own re-initialized A
                layer_key = jax.random.split(layer_key, p["a"].shape[0])
            merge = _per_expert(layers_lib.relora_merge, p["a"].ndim, (0, 0, 0, None, 0))
            w0, a, b = merge(w0, p["a"], p["b"], layer.scale, layer_key)
            structure = set_path(structure, layer.path + ("w0",), w0)
            params = set_path(params, layer.path, {**p, "a": a, "b": b})
            cleared[layer.path + ("a",)] = cleared[layer.path + ("b",)] = jnp.ones((), bool)
        return params, structure, zero_moments(opt_state, params, self._reset(params, cleared))

    def _refactor(self, params: Any, structure: Any, opt_state: Any, key: jax.Array):
        del key
        cleared = {}
        for layer in self.layers:
            p = get_path(params, layer.path)
            a, b = _per_expert(layers_lib.refactorize, p["a"].ndim)(p["a"], p["b"])
            params = set_path(params, layer.path, {**p, "a": a, "b": b})
            cleared[layer.path + ("a",)] = cleared[layer.path + ("b",)] = jnp.ones((), bool)
        return params, structure, zero_moments(opt_state, params, self._reset(params, cleared))

    def _sst(self, t: jax.Array, params: Any, structure: Any, opt_state: Any, key: jax.Array):
        c = self.config.sst
        for layer in self.layers:  # unit-norm vectors after every update (SST)
            p = get_path(params, layer.path)
            u, s, v = layers_lib.sst_renormalize(p["u"], p["s"], p["v"])
            params = set_path(params, layer.path, {**p, "u": u, "s": s, "v": v})

        def reorthogonalize(params, structure, opt_state, key):
            cleared = {}
            for layer in self.layers:
                p = get_path(params, layer.path)
                u, s, v = layers_lib.sst_reorthogonalize(p["u"], p["s"], p["v"])
                params = set_path(params, layer.path, {**p, "u": u, "s": s, "v": v})
                cleared[layer.path + ("u",)] = cleared[layer.path + ("v",)] = jnp.ones((), bool)
            return params, structure, zero_moments(opt_state, params,
                                                   self._reset(params, cleared))

        def resample(params, structure, opt_state, key):
            cleared = {}
            for i, layer in enumerate(self.layers):
                p = get_path(params, layer.path)
                old = get_path(structure, layer.path)["selection"]
                new = layers_lib.sst_sample(p["s"], layer.rank, jax.random.fold_in(key, i))
                structure = set_path(structure, layer.path + ("selection",), new)
                changed = old != new  # fresh moments for newly picked and dropped pairs
                cleared[layer.path + ("u",)] = jnp.broadcast_to(changed[None, :], p["u"].shape)
                cleared[layer.path + ("v",)] = jnp.broadcast_to(changed[:, None], p["v"].shape)
            return params, structure, zero_moments(opt_state, params,
                                                   self._reset(params, cleared))

        operands = (params, structure, opt_state)
        operands = self._every(t, c.reorth_every, reorthogonalize, key, operands)
        return self._every(t, c.resample_every, resample, jax.random.fold_in(key, 7), operands)


def _per_expert(fn: Callable, ndim: int, in_axes: Any = 0) -> Callable:
    """`fn` on a layer's 2-D factors as is; on an MoE stack's (E, ., .) factors, vmapped over
    the experts."""
    return fn if ndim == 2 else jax.vmap(fn, in_axes=in_axes)


def _find_modules(tree: Any, keys: set[str], prefix: tuple = ()) -> list[tuple[Any, ...]]:
    """Paths of modules whose params include all `keys`, in tree order."""
    if not isinstance(tree, dict):
        return []
    found = [prefix] if keys <= set(tree) else []
    for key, child in tree.items():
        found += _find_modules(child, keys, prefix + (key,))
    return found
