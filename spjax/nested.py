"""Flat path-keyed dicts back into nested plain dicts, for checkpoints ('a/b' keys) and sweep
markers ('a.b' config keys)."""

from __future__ import annotations

from typing import Any


def nest_paths(flat: dict[str, Any], sep: str = "/") -> dict[str, Any]:
    """{'a/b': x} -> {'a': {'b': x}}; the inverse of checkpoint.flat_paths with sep '/'."""
    tree: dict[str, Any] = {}
    for path, leaf in flat.items():
        *parents, last = path.split(sep)
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = leaf
    return tree
