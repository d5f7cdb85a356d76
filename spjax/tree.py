"""Helpers over nested dicts and pytrees that every layer uses: paths into the params and
structure trees, flat '/'-joined path keys (checkpoints) and back, and the optimizer-state
surgery of pruning and merging (zeroing the moments of reset entries in any optax state)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def get_path(tree: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path: tuple[Any, ...], value: Any) -> dict:
    """A copy of `tree` with `path` replaced (copies only the dicts along the path)."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    return {**tree, head: set_path(tree[head], rest, value)}


def flat_paths(tree: Any) -> dict[str, Any]:
    """{'a/b/0/c': leaf} of a pytree, keys as strings whatever their type."""
    def name(key: Any) -> str:
        return str(getattr(key, "key", getattr(key, "idx", getattr(key, "name", key))))

    return {"/".join(name(k) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def nest_paths(flat: dict[str, Any], sep: str = "/") -> dict[str, Any]:
    """{'a/b': x} -> {'a': {'b': x}}; the inverse of flat_paths with sep '/'."""
    tree: dict[str, Any] = {}
    for path, leaf in flat.items():
        *parents, last = path.split(sep)
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = leaf
    return tree


def zero_moments(opt_state: Any, params: Any, reset: Any) -> Any:
    """Zeroes, in every params-shaped part of any optax state (Adam's mu and nu, SGD's trace,
    ...), the entries where `reset` (a params-shaped tree of bools or scalar False) is True."""
    params_def = jax.tree.structure(params)

    def is_params_like(node: Any) -> bool:
        return jax.tree.structure(node) == params_def

    def clear(node: Any) -> Any:
        if not is_params_like(node):
            return node
        return jax.tree.map(
            lambda leaf, r: jnp.where(r, jnp.zeros_like(leaf), leaf)
            if hasattr(leaf, "shape") and jnp.shape(r) in ((), leaf.shape) else leaf,
            node, reset)

    return jax.tree.map(clear, opt_state, is_leaf=is_params_like)
