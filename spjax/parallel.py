"""Device mesh, logical-axis sharding rules, and activation constraints.

Mesh axes are named (data, fsdp, expert, tensor), tensor innermost (the fastest links). Every
model variable carries logical axis names in its `axes` metadata (e.g. a kernel is
("embed", "mlp")); the ordered rules of `parallel.rules` (rules.py) map each logical name to
mesh axes. With the defaults, matrices are split along `embed` over `fsdp` (ZeRO-3 style: XLA
all-gathers them for the matmul), along heads/mlp/vocab over `tensor` (Megatron-style), experts
over `expert`, and the batch over data x fsdp x expert. Optimizer moments get exactly their
parameter's sharding.

Axis types are chosen here, once: Auto, so XLA's partitioner propagates shardings through
the model and only the boundaries (state, batch, block activations) are pinned.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from spjax.config import ParallelConfig
from spjax.errors import ConfigError
from spjax.rules import Rules

MESH_AXES = ("data", "fsdp", "expert", "tensor")

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "spjax_active_mesh", default=None)


def make_mesh(config: ParallelConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    others = config.fsdp * config.expert * config.tensor
    data = config.data if config.data != -1 else n // others
    if data < 1 or data * others != n:
        raise ConfigError(
            f"parallel.data ({config.data}) x fsdp ({config.fsdp}) x expert ({config.expert}) x "
            f"tensor ({config.tensor}) must use all {n} devices; set parallel.data=-1 to fill, "
            f"or choose sizes whose product is {n}")
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    shape = (data, config.fsdp, config.expert, config.tensor)
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)


def sharding_rules(config: ParallelConfig) -> Rules:
    """The rules of parallel.rules; each maps to null, a mesh axis or a list of mesh axes."""
    rules = Rules.from_pairs(config.rules, source="parallel.rules")
    for i, target in enumerate(rules.values):
        names = (target,) if isinstance(target, str) else target
        if target is not None and not (isinstance(names, (list, tuple)) and
                                       all(name in MESH_AXES for name in names)):
            raise ConfigError(f"parallel.rules[{i}]: {target!r} is not a mesh axis; map to "
                              f"null (replicated), one of {', '.join(MESH_AXES)}, or a list "
                              f"of them")
    return rules


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], rules: Rules,
                    mesh: Mesh) -> P:
    """PartitionSpec for a tensor with logical `axes`.

    A mesh axis is used at most once per tensor; a dimension the mesh axes do not divide stays
    replicated rather than failing, so odd sizes (a 257-token vocabulary) still run.
    """
    used: set[str] = set()
    spec: list[Any] = []
    for name, dim in zip(axes, shape):
        target = rules.lookup(name or "", None)
        names = (target,) if isinstance(target, str) else tuple(target or ())
        names = tuple(a for a in names if a not in used and mesh.shape[a] > 1)
        if not names or dim % math.prod(mesh.shape[a] for a in names):
            spec.append(None)
            continue
        used.update(names)
        spec.append(names[0] if len(names) == 1 else names)
    return P(*spec)


def variable_shardings(state: nnx.State, mesh: Mesh, rules: Rules) -> Any:
    """Pure-dict pytree of NamedSharding, one per variable, from its `axes` metadata."""

    def one(variable: nnx.Variable) -> NamedSharding:
        shape = variable.get_value().shape
        axes = variable.get_metadata().get("axes") or (None,) * len(shape)
        if len(axes) != len(shape):
            raise ValueError(f"axes {axes} do not match shape {shape}")
        return NamedSharding(mesh, logical_to_spec(axes, shape, rules, mesh))

    shardings = jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(shardings)


def like_params_shardings(tree: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for an optimizer-state-like tree: every subtree shaped like `params` (Adam's mu
    and nu, any optax state) follows the parameters' shardings. A leaf whose shape differs from
    its parameter's (GaLore's projected moments and projectors) keeps the parameter's split on
    each dimension of unchanged size and is replicated on the others; the rest is replicated."""
    params_def = jax.tree.structure(params)
    replicated = NamedSharding(mesh, P())

    def is_params_like(node: Any) -> bool:
        return jax.tree.structure(node) == params_def

    def follow(leaf: Any, param: Any, sharding: NamedSharding) -> NamedSharding:
        if leaf.shape == param.shape:
            return sharding
        if len(leaf.shape) != len(param.shape):
            return replicated
        spec = [axis if a == b else None
                for axis, a, b in zip(sharding.spec, leaf.shape, param.shape)]
        return NamedSharding(mesh, P(*spec))

    def assign(node: Any) -> Any:
        if is_params_like(node):
            return jax.tree.map(follow, node, params, param_shardings)
        return jax.tree.map(lambda _: replicated, node)

    return jax.tree.map(assign, tree, is_leaf=is_params_like)


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 2) -> NamedSharding:
    """Batch-major arrays: the leading axis is `batch`, the rest replicated."""
    target = rules.lookup("batch", None)
    names = (target,) if isinstance(target, str) else tuple(target or ())
    names = tuple(a for a in names if mesh.shape[a] > 1)
    lead = None if not names else (names[0] if len(names) == 1 else names)
    return NamedSharding(mesh, P(lead, *([None] * (ndim - 1))))


def batch_divisor(mesh: Mesh, rules: Rules) -> int:
    spec = batch_sharding(mesh, rules).spec[0]
    names = (spec,) if isinstance(spec, str) else tuple(spec or ())
    return math.prod(mesh.shape[a] for a in names)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Within this context, `constrain` pins activations to the mesh by logical axes."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active() -> tuple[Mesh, Rules] | None:
    """The (mesh, rules) of the enclosing `activate`, or None."""
    return _ACTIVE.get()


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical axis names; a no-op outside `activate`."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(mesh, logical_to_spec(axes, x.shape, rules, mesh)))


def host_to_global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assembles each process's local rows into one global array (single- or multi-process)."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
