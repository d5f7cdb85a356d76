"""The sparsity engine: connects a method to the train state.

It finds the masked layers in the params/structure trees, decides per-layer targets (rules +
distribution), and gives the train step four pure functions:

  init(params, structure, key)             masks at step 0 (kernels of hard methods pruned)
  prepare(t, structure)                    per-step forward factors (MDGF)
  optimizer_grads(t, grads, params, structure)   masked / straight-through / decayed grads
  update(t, params, structure, opt_state, grads, key)
                                           on schedule (lax.cond): new masks; pruned weights
                                           zeroed, regrown ones start at zero, and every
                                           changed weight's optimizer moments zeroed, for any
                                           optax state
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from pallas_kernels.device import hopper_gpu
from spjax.errors import ConfigError
from spjax.model.blocksparse import tables_for
from spjax.model.linear import LinearSpec
from spjax.rules import Rules
from spjax.config.sparsity import SparsityConfig
from spjax.sparsity.masks import counts_for, erk_densities
from spjax.sparsity.methods import Method, SparseLayer, build_method
from spjax.tree import get_path, set_path, zero_moments


def layer_rules(config: SparsityConfig) -> Rules:
    return Rules.from_pairs(config.rules, source="sparsity.rules")


# Config names for per-product implementations (forward, input grad, weight grad)
KERNEL_COMBINATIONS = {"mosaic_fwd": "mosaic,pallas,pallas",
                       "mosaic_ws": "mosaic_ws,mosaic_ws,pallas",
                       "mosaic_stream": "mosaic_stream,mosaic_stream,pallas"}


def auto_block_kernel(block: int, compute_dtype: str) -> str:
    """sparsity.kernel=auto: on a Hopper GPU at block 128 in bfloat16, the warp-specialized
    Mosaic forward and input gradient with one TMA ring through each program's tiles (fastest
    end to end at 350M in two runs: 1.41x and 1.39x dense, against 1.38x and 1.35x for
    'mosaic_ws' and 1.28x for the Triton kernels, docs/BENCHMARKS.md); the Triton kernels on
    other GPUs and settings (block 64 on Mosaic is not yet measured end to end); the plain-jnp
    reference off GPU."""
    if jax.devices()[0].platform != "gpu":
        return "xla"
    fits = hopper_gpu() and block == 128 and compute_dtype == "bfloat16"
    return "mosaic_stream" if fits else "pallas"


def layer_assignment(config: SparsityConfig,
                     compute_dtype: str = "float32") -> Callable[[str], LinearSpec]:
    """Linear-factory assignment: masked where the rules say 'sparse' or give a density."""
    if not config.enabled:
        return lambda name: LinearSpec()
    rules = layer_rules(config)
    sparse = LinearSpec("masked")
    if config.pattern == "block" and config.kernel != "none":
        kernel = config.kernel
        if kernel == "auto":
            kernel = auto_block_kernel(config.block, compute_dtype)
        kernel = KERNEL_COMBINATIONS.get(kernel, kernel)
        sparse = LinearSpec("blocksparse", block=config.block, kernel=kernel)

    def assign(name: str) -> LinearSpec:
        value = rules.lookup(name, "dense")
        _check_rule_value(name, value)
        return LinearSpec() if value == "dense" else sparse

    return assign


def _check_rule_value(name: str, value: Any) -> None:
    if value in ("dense", "sparse"):
        return
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1:
        return
    raise ConfigError(f"sparsity.rules: value for '{name}' must be 'sparse', 'dense' or a "
                      f"density in (0, 1], got {value!r}")


def _find_masks(tree: Any, prefix: tuple = ()) -> list[tuple[Any, ...]]:
    """Paths of modules that hold a 'mask' leaf, in tree order."""
    if not isinstance(tree, dict):
        return []
    found = [prefix] if "mask" in tree else []
    for key, child in tree.items():
        found += _find_masks(child, prefix + (key,))
    return found


@dataclasses.dataclass(frozen=True)
class SparsityEngine:
    config: SparsityConfig
    method: Method
    layers: tuple[SparseLayer, ...]

    @classmethod
    def build(cls, config: SparsityConfig, abstract_structure: Any,
              total_steps: int) -> SparsityEngine | None:
        """None when sparsity is off. `abstract_structure`: the pure-dict structure tree
        (shapes suffice); its 'mask' leaves say which layers are masked."""
        if not config.enabled:
            return None
        rules = layer_rules(config)
        paths = _find_masks(abstract_structure)
        if not paths:
            raise ConfigError("sparsity.rules mark no linear layer 'sparse'; check the regexes "
                              "against names like 'layers/0/mlp/up'")
        shapes = {_name(p): tuple(get_path(abstract_structure, p)["mask"].shape) for p in paths}
        values = {name: rules.lookup(name, "dense") for name in shapes}
        units = {name: _units(config, name, shape) for name, shape in shapes.items()}
        free = {name: shapes[name] for name, value in values.items() if value == "sparse"}
        if config.pattern == "nm":
            if len(free) != len(shapes):
                raise ConfigError("sparsity.rules: explicit densities do not apply to pattern "
                                  "'nm' (every N:M layer has density n/m); use 'sparse'")
            densities = {name: config.n / config.m for name in free}
        elif config.distribution == "erk" and free:
            densities = erk_densities(free, config.density)
        else:
            densities = {name: config.density for name in free}
        densities.update({name: float(v) for name, v in values.items() if v != "sparse"})
        keep = counts_for(densities, units)
        if config.pattern == "nm":
            keep = {name: units[name] * config.n // config.m for name in shapes}
        layers = tuple(SparseLayer(_name(p), p, shapes[_name(p)], densities[_name(p)],
                                   units[_name(p)], keep[_name(p)]) for p in paths)
        return cls(config, build_method(config, total_steps), layers)

    # ------------------------------------------------------------------ step functions

    def init(self, params: Any, structure: Any, key: jax.Array) -> tuple[Any, Any]:
        """Each layer's mask (and tables, and pruned kernel) through one jit per distinct
        layer shape and target (`_layer_init`), called layer by layer. One jit over every
        layer compiled a program of 168 mask selections at 350M block-sparse, about 50 s on an
        H100; a few one-layer programs compile in a second or two. Values are the same."""
        for i, layer in enumerate(self.layers):
            kernel = get_path(params, layer.path)["kernel"]
            with_tables = "tables" in get_path(structure, layer.path)
            mask, tables, kernel = self._layer_init(layer, with_tables)(
                kernel, jax.random.fold_in(key, i))
            structure = set_path(structure, layer.path + ("mask",), mask)
            if with_tables:
                structure = set_path(structure, layer.path + ("tables",), tables)
            if self.method.hard:
                params = set_path(params, layer.path + ("kernel",), kernel)
        return params, self.prepare(jnp.zeros((), jnp.int32), structure)

    @functools.cached_property
    def _layer_inits(self) -> dict[tuple[Any, ...], Callable]:
        return {}  # (shape, density, units, keep, tables) -> jitted one-layer init

    def _layer_init(self, layer: SparseLayer, with_tables: bool) -> Callable:
        """(kernel, key) -> (mask, block tables or None, kernel with pruned weights zeroed),
        jitted once per layer signature (the method sees only shape and targets)."""
        signature = (layer.shape, layer.density, layer.units, layer.keep, with_tables)
        if signature not in self._layer_inits:
            template = dataclasses.replace(layer, name="", path=())

            def one(kernel: jax.Array, key: jax.Array) -> tuple[Any, Any, jax.Array]:
                mask = from_matrix(self.method.init(template, as_matrix(kernel), key),
                                   kernel.shape)
                tables = tables_for(mask, self.config.block) if with_tables else None
                return mask, tables, kernel * mask.astype(kernel.dtype)

            self._layer_inits[signature] = jax.jit(one)
        return self._layer_inits[signature]

    def _set_mask(self, structure: Any, layer: SparseLayer, mask: jax.Array) -> Any:
        """Sets a layer's mask, and the block tables of kernel-backed layers with it (their
        only rebuild: tables change exactly when masks do)."""
        structure = set_path(structure, layer.path + ("mask",), mask)
        if "tables" in get_path(structure, layer.path):
            tables = tables_for(mask, self.config.block)
            structure = set_path(structure, layer.path + ("tables",), tables)
        return structure

    def prepare(self, t: jax.Array, structure: Any) -> Any:
        """Per-step forward settings: MDGF's pruned-weight factor, and the dense-gradient flag
        of kernel-backed layers on the steps whose update reads dense gradients (RigL)."""
        scale = self.method.pruned_scale(t)
        dense_grad = self.method.needs_dense_grad(t + 1)
        for layer in self.layers:
            structure = set_path(structure, layer.path + ("pruned_scale",), scale)
            if "dense_grad" in get_path(structure, layer.path):
                structure = set_path(structure, layer.path + ("dense_grad",), dense_grad)
        return structure

    def optimizer_grads(self, t: jax.Array, grads: Any, params: Any, structure: Any) -> Any:
        for layer in self.layers:
            path = layer.path + ("kernel",)
            grad = self.method.optimizer_grad(t, get_path(params, path),
                                              get_path(structure, layer.path + ("mask",)),
                                              get_path(grads, path))
            grads = set_path(grads, path, grad)
        return grads

    def update(self, t: jax.Array, params: Any, structure: Any, opt_state: Any, grads: Any,
               key: jax.Array) -> tuple[Any, Any, Any]:
        """Runs the method's mask update when due (else only re-applies hard masks)."""

        def change(operands: tuple[Any, Any, Any]) -> tuple[Any, Any, Any]:
            params, structure, opt_state = operands
            reset = jax.tree.map(lambda _: jnp.zeros((), bool), params)
            for i, layer in enumerate(self.layers):
                kernel = get_path(params, layer.path)["kernel"]
                old = get_path(structure, layer.path)["mask"]
                new = from_matrix(self.method.update(
                    t, layer, as_matrix(kernel), as_matrix(old),
                    as_matrix(get_path(grads, layer.path)["kernel"]),
                    jax.random.fold_in(key, i)), old.shape)
                structure = self._set_mask(structure, layer, new)
                if self.method.hard:
                    # regrown weights (new but not old) restart from zero, like pruned ones
                    kernel = jnp.where(new & old, kernel, jnp.zeros_like(kernel))
                    params = set_path(params, layer.path + ("kernel",), kernel)
                    reset = set_path(reset, layer.path + ("kernel",), new != old)
            if self.method.hard:
                opt_state = zero_moments(opt_state, params, reset)
            return params, structure, opt_state

        params, structure, opt_state = jax.lax.cond(
            self.method.due(t), change, lambda operands: operands,
            (params, structure, opt_state))
        if self.method.hard:  # exact zeros whatever the optimizer does (cheap, elementwise)
            for layer in self.layers:
                kernel = get_path(params, layer.path)["kernel"]
                mask = get_path(structure, layer.path)["mask"]
                params = set_path(params, layer.path + ("kernel",),
                                  kernel * mask.astype(kernel.dtype))
        return params, structure, opt_state

    # ------------------------------------------------------------------ accounting

    def nonzero_counts(self, structure: Any) -> dict[str, jax.Array]:
        return {layer.name: jnp.sum(get_path(structure, layer.path)["mask"], dtype=jnp.int32)
                for layer in self.layers}

    @property
    def masked_size(self) -> int:
        return sum(math.prod(layer.shape) for layer in self.layers)

    @property
    def dense_weight_gradient(self) -> bool:
        """STE methods need the full weight gradient; hard methods only at kept weights."""
        return not self.method.hard


def _name(path: tuple[Any, ...]) -> str:
    return "/".join(str(p) for p in path)


def as_matrix(x: jax.Array) -> jax.Array:
    """The 2-D view the methods work on. A stack of experts (E, I, O) is seen as the I x (E O)
    matrix of its experts side by side: N:M groups run along each expert's input dimension,
    and b x b blocks stay inside one expert when b divides O."""
    if x.ndim == 2:
        return x
    experts, d_in, d_out = x.shape
    return jnp.moveaxis(x, 0, 1).reshape(d_in, experts * d_out)


def from_matrix(x_IxEO: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    if len(shape) == 2:
        return x_IxEO
    experts, d_in, d_out = shape
    return jnp.moveaxis(x_IxEO.reshape(d_in, experts, d_out), 1, 0)


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    return (shape[0], shape[1]) if len(shape) == 2 else (shape[1], shape[0] * shape[2])


def _units(config: SparsityConfig, name: str, shape: tuple[int, ...]) -> int:
    if len(shape) == 3 and config.pattern == "block" and shape[2] % config.block:
        raise ConfigError(f"sparsity.block {config.block} does not divide the expert width "
                          f"{shape[2]} of layer '{name}'; choose a block that divides it or "
                          f"mark the experts dense in sparsity.rules")
    d_in, d_out = matrix_shape(shape)
    if config.pattern == "block":
        b = config.block
        if d_in % b or d_out % b:
            raise ConfigError(f"sparsity.block {b} does not divide layer '{name}' of shape "
                              f"{d_in}x{d_out}; choose a block that divides both dimensions or "
                              f"mark the layer dense in sparsity.rules")
        return (d_in // b) * (d_out // b)
    if config.pattern == "nm" and d_in % config.m:
        raise ConfigError(f"sparsity.m {config.m} does not divide the input dimension {d_in} of "
                          f"layer '{name}'; choose another m or mark the layer dense")
    return d_in * d_out
