"""ReLoRA's warm start: `train.init_from` a full-rank run makes its kernels ReLoRA's frozen W0."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from spjax import parallel
from spjax.checkpoint import restore_matching
from spjax.cli import main
from spjax.config import load_config
from spjax.data.prepare import prepare_dataset
from spjax.train.loop import resolve_config
from spjax.train.state import Program, state_layout

STDLIB = Path(sys.modules["json"].__file__).parents[1]
SMALL = ["model=tiny", "model.d_model=64", "model.d_ff=160", "model.n_heads=2",
         "model.n_layers=1", "data.seq_len=64", "data.batch_size=8", "train.progress=false",
         "train.eval_batches=1", "train.log_every=2", "optimizer.warmup_steps=0"]
RELORA = ["lowrank.method=relora", "lowrank.rank=8", "lowrank.relora.merge_every=100"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "ds"
    prepare_dataset([str(STDLIB / "json")], out, val_fraction=0.1, progress=False)
    return out


def _saved(run_dir: Path, overrides: list[str]) -> dict[str, np.ndarray]:
    config, _ = resolve_config(load_config(None, overrides))
    program = Program.build(config)
    layout = state_layout(program, parallel.make_mesh(config.parallel),
                          parallel.sharding_rules(config.parallel))
    restored, _, _ = restore_matching(run_dir, {"params": layout.abstract.params,
                                                "structure": layout.abstract.structure})
    return {k: np.asarray(v) for k, v in restored.items()}


def test_relora_warm_starts_from_a_full_rank_run(dataset, tmp_path, capsys):
    dense_args = [*SMALL, f"data.path={dataset}", f"run_dir={tmp_path / 'dense'}",
                  "train.steps=4", "train.checkpoint_every=4"]
    assert main(["train", _empty(tmp_path), *dense_args]) == 0
    relora_args = [*SMALL, *RELORA, f"data.path={dataset}", f"run_dir={tmp_path / 'relora'}",
                   "train.steps=2", "train.checkpoint_every=2",
                   f"train.init_from={tmp_path / 'dense'}"]
    capsys.readouterr()
    assert main(["train", _empty(tmp_path), *relora_args]) == 0
    printed = capsys.readouterr().out
    fresh = printed.split("freshly initialized: ")[1].splitlines()[0].split(", ")
    assert fresh and all(p.endswith(("/a", "/b")) for p in fresh), fresh  # only the factors

    dense = _saved(tmp_path / "dense", dense_args)
    relora = _saved(tmp_path / "relora", relora_args)
    w0 = {p: v for p, v in relora.items() if p.endswith("/w0")}
    assert len(w0) == 7  # q, k, v, o, gate, up, down of the one layer
    for path, value in w0.items():  # frozen, so still exactly the dense run's trained kernel
        kernel = "params/" + path.removeprefix("structure/").removesuffix("/w0") + "/kernel"
        np.testing.assert_array_equal(value, dense[kernel])


def _empty(tmp_path: Path) -> str:
    path = tmp_path / "empty.yaml"
    path.write_text("{}\n")
    return str(path)
