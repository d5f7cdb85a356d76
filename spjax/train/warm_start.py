"""train.init_from: a new run starts from another run's trained parameters and structure.

Matched by path: what the source lacks (a new attention gate) keeps its fresh init; a dense
run's kernels become a ReLoRA run's frozen W0 (warm start). Optimizer, step and data start
afresh.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from spjax.checkpoint import restore_matching
from spjax.tree import flat_paths
from spjax.errors import CheckpointError
from spjax.tree import nest_paths
from spjax.train.state import Program, TrainState


def init_from(source: str, state: TrainState, program: Program, layout: Any, is_main: bool
              ) -> TrainState:
    """train.init_from: the parameters and structure another run's latest checkpoint holds
    (matched by path) replace the fresh ones; the rest (a new gate) keeps its init. Optimizer
    state, step and data start afresh (AdamW's moments are zeros whatever the weights)."""
    fresh = {"params": state.params, "structure": state.structure}
    abstract = {"params": layout.abstract.params, "structure": layout.abstract.structure}
    aliases = _warm_start_aliases(abstract)
    restored, missing, step = restore_matching(source, _with_aliases(abstract, aliases))
    for source_path, path in aliases.items():  # a dense run's kernel becomes ReLoRA's W0
        kernel = restored.pop(source_path, None)  # never counted as a tensor of its own
        if kernel is not None and path not in restored:  # a ReLoRA run's own W0 wins
            restored[path] = kernel
            missing.remove(path)
        if source_path in missing:
            missing.remove(source_path)
    if not any(path.startswith("params/") for path in restored):
        raise CheckpointError(f"train.init_from: the checkpoint in '{source}' holds none of "
                              f"this model's parameters; is it a run of the same model?")
    paths = list(flat_paths(fresh))
    leaves = [restored.get(path, leaf) for path, leaf in zip(paths, jax.tree.leaves(fresh))]
    merged = jax.tree.unflatten(jax.tree.structure(fresh), leaves)
    if is_main:
        fresh_params = [p.removeprefix("params/") for p in missing if p.startswith("params/")]
        print(f"spjax: initialized from {source} (step {step}): {len(restored)} of "
              f"{len(paths)} tensors; freshly initialized: {', '.join(fresh_params) or 'none'}",
              flush=True)
    accounting = jax.device_put(program.accounting.initial_state(merged["structure"]),
                                layout.state.accounting)
    return dataclasses.replace(state, params=merged["params"], structure=merged["structure"],
                               accounting=accounting)


def _warm_start_aliases(abstract: dict[str, Any]) -> dict[str, str]:
    """{'params/<layer>/kernel': 'structure/<layer>/w0'} for every ReLoRA layer: ReLoRA's warm
    start (Lialin et al.) begins from a full-rank run, whose kernel is this run's frozen W0.
    The factors keep their init (B = 0), so the model starts as the dense run's function."""
    aliases = {}
    for path in flat_paths(abstract):
        if path.startswith("structure/") and path.endswith("/w0"):
            layer = path.removeprefix("structure/").removesuffix("/w0")
            aliases[f"params/{layer}/kernel"] = path
    return aliases


def _with_aliases(abstract: dict[str, Any], aliases: dict[str, str]) -> dict[str, Any]:
    """`abstract` as nested plain dicts, plus one entry per alias shaped like its target."""
    leaves = flat_paths(abstract)
    leaves.update({source_path: leaves[path] for source_path, path in aliases.items()})
    return nest_paths(leaves)
