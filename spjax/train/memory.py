"""Memory accounting per weight structure: trainable parameters, parameter bytes, bytes of
non-trainable structure (masks, sparse indices, frozen kernels), and optimizer-state bytes.

Computed from shapes alone (the abstract train state), so `spjax train --dry-run` reports it
without allocating anything. Every array of the train state is attributed to a group:

- a linear layer's arrays go to its structure (`dense`, `masked`, `lowrank`, `sltrain`, ...),
  the LM head to `lm_head`;
- the token embedding to `embedding`, RMSNorm scales to `norms`;
- optimizer state: each params-shaped part (Adam's mu and nu, GaLore's projected moments and
  projectors...) entry by entry to its parameter's group; scalars (step counts) to `other`.
"""

from __future__ import annotations

import collections
from typing import Any

import jax
from flax import nnx

from spjax.model.structures import EXPERT_STRUCTURES, STRUCTURES
from spjax.train.state import ModelDef, TrainState

COLUMNS = ("layers", "trainable_params", "param_bytes", "structure_bytes", "optimizer_bytes")


def _key(entry: Any) -> Any:
    return getattr(entry, "key", getattr(entry, "idx", entry))


def _paths(tree: Any) -> list[tuple[tuple[Any, ...], Any]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(tuple(_key(k) for k in path), leaf) for path, leaf in flat]


def structure_groups(model_def: ModelDef) -> dict[tuple[Any, ...], str]:
    """Module path -> structure name, for every linear layer of the model."""
    names = {cls: name for name, cls in {**STRUCTURES, **EXPERT_STRUCTURES}.items()}
    model = nnx.eval_shape(lambda: model_def.create(0))
    groups = {}
    for path, node in nnx.iter_graph(model):
        if type(node) in names:
            groups[tuple(path)] = "lm_head" if path == ("lm_head",) else names[type(node)]
    return groups


def _group(path: tuple[Any, ...], groups: dict[tuple[Any, ...], str]) -> str:
    for end in range(len(path), 0, -1):
        if path[:end] in groups:
            return groups[path[:end]]
    if path and path[0] == "embed":
        return "embedding"
    if path and path[-1] == "scale":
        return "norms"
    return "other"


def memory_report(model_def: ModelDef, abstract: TrainState) -> dict[str, dict[str, int]]:
    """{group: {layers, trainable_params, param_bytes, structure_bytes, optimizer_bytes}}
    plus a 'total' row."""
    groups = structure_groups(model_def)
    rows: dict[str, dict[str, int]] = collections.defaultdict(lambda: dict.fromkeys(COLUMNS, 0))
    for name in groups.values():
        rows[name]["layers"] += 1
    for path, leaf in _paths(abstract.params):
        row = rows[_group(path, groups)]
        row["trainable_params"] += leaf.size
        row["param_bytes"] += leaf.size * leaf.dtype.itemsize
    for path, leaf in _paths(abstract.structure):
        rows[_group(path, groups)]["structure_bytes"] += leaf.size * leaf.dtype.itemsize

    params_def = jax.tree.structure(abstract.params)
    is_params_like = lambda node: jax.tree.structure(node) == params_def  # noqa: E731
    for part in jax.tree.leaves(abstract.opt_state, is_leaf=is_params_like):
        if is_params_like(part):
            for path, leaf in _paths(part):
                rows[_group(path, groups)]["optimizer_bytes"] += leaf.size * leaf.dtype.itemsize
        else:
            rows["other"]["optimizer_bytes"] += part.size * part.dtype.itemsize
    total = dict.fromkeys(COLUMNS, 0)
    for row in rows.values():
        for column in COLUMNS:
            total[column] += row[column]
    return {**dict(sorted(rows.items())), "total": total}


def format_report(report: dict[str, dict[str, int]]) -> str:
    mib = lambda n: f"{n / 2**20:,.1f}"  # noqa: E731
    width = max(10, *(len(name) for name in report))
    lines = [f"{'structure':<{width}} {'layers':>6} {'trainable':>14} {'params MiB':>11} "
             f"{'structure MiB':>14} {'optimizer MiB':>14} {'total MiB':>10}"]
    for name, row in report.items():
        total = row["param_bytes"] + row["structure_bytes"] + row["optimizer_bytes"]
        lines.append(f"{name:<{width}} {row['layers']:>6} {row['trainable_params']:>14,} "
                     f"{mib(row['param_bytes']):>11} {mib(row['structure_bytes']):>14} "
                     f"{mib(row['optimizer_bytes']):>14} {mib(total):>10}")
    return "\n".join(lines)
