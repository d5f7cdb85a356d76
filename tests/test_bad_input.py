"""Bad input to every command is one line `spjax: error: ...` on stderr, exit status 2.

One table: each row builds a malformed input under tmp_path (config keys and values, config
files, data files and folders, tokenizers, prepared datasets, run directories, checkpoints,
sweep specs, runs tables), runs the CLI in-process through `spjax.cli.main`, and checks that
the command ends with exactly one stderr line, `spjax: error: ...`, naming the culprit (the
key, file or field in the row), with status 2 and no traceback. A row whose input raised an
uncaught exception fails (the exception propagates out of `main`), and so does one whose
message is several lines, vague, or about something else.

argparse's own errors (an unknown subcommand, a missing argument, `--vocab-size ten`) are
not rows here: argparse prints a usage line before its error line and exits through
SystemExit(2); tests/test_cli.py checks those.

Rows that train nothing fail before any compile. The checkpoint rows damage copies of one
finished two-step run of a one-layer model, trained once for the module.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import sysconfig
from pathlib import Path
from typing import Callable

import pytest
import yaml

from spjax.cli import main
from spjax.config import CONFIGS_DIR
from spjax.data import prepare_dataset

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TINY_YAML = str(CONFIGS_DIR / "tiny.yaml")
# A one-layer, 32-wide model on 8 x 32 tokens per step: the finished run trains in seconds.
TINY = ("model.n_layers=1", "model.d_model=32", "model.d_ff=64", "model.n_heads=2",
        "data.seq_len=32", "data.batch_size=8", "train.steps=2", "train.log_every=1",
        "train.eval_batches=1", "train.progress=false")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "ds"
    prepare_dataset([str(STDLIB / "json")], out, val_fraction=0.2, progress=False)
    return out


@pytest.fixture(scope="module")
def finished_run(dataset, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", TINY_YAML, f"run_dir={run_dir}", f"data.path={dataset}", *TINY]) == 0
    assert (run_dir / "checkpoints" / "2" / "state").is_dir()
    return run_dir


class Inputs:
    """What a row's `build` gets: its own tmp_path, and on demand the module's dataset and
    copies of it or of the finished run to damage."""

    def __init__(self, tmp: Path, request: pytest.FixtureRequest):
        self.tmp, self._request = tmp, request

    @property
    def data(self) -> Path:
        return self._request.getfixturevalue("dataset")

    def run(self) -> Path:
        """A copy of the finished run, at tmp/run."""
        return Path(shutil.copytree(self._request.getfixturevalue("finished_run"),
                                    self.tmp / "run"))

    def data_copy(self) -> Path:
        """A copy of the dataset, at tmp/ds."""
        return Path(shutil.copytree(self.data, self.tmp / "ds"))

    def write(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return path

    def folder(self, name: str) -> Path:
        (self.tmp / name).mkdir()
        return self.tmp / name


@dataclasses.dataclass(frozen=True)
class Row:
    id: str
    build: Callable[[Inputs], list[str]]  # makes the bad input; returns the argv
    needle: str  # the culprit (key, file, field): the message must name it


def train(x: Inputs, *overrides: str, config: str = TINY_YAML) -> list[str]:
    """`spjax train` of the tiny model in a fresh run_dir under tmp (never the config's
    runs/tiny), then `overrides` (a later run_dir= wins)."""
    return ["train", config, *TINY, f"run_dir={x.tmp / 'fresh'}", *overrides]


def on_data(x: Inputs, ds: Path, *overrides: str) -> list[str]:
    return train(x, f"data.path={ds}", *overrides)


def edit_meta(x: Inputs, change: Callable[[dict], object]) -> list[str]:
    ds = x.data_copy()
    meta = json.loads((ds / "meta.json").read_text())
    change(meta)
    (ds / "meta.json").write_text(json.dumps(meta))
    return on_data(x, ds)


def meta_not_json(x: Inputs) -> list[str]:
    ds = x.data_copy()
    (ds / "meta.json").write_text("{not json")
    return on_data(x, ds)


def shard_missing(x: Inputs) -> list[str]:
    ds = x.data_copy()
    (ds / "train" / "00000.bin").unlink()
    return on_data(x, ds)


def no_val_split(x: Inputs) -> list[str]:
    ds = x.tmp / "noval"
    prepare_dataset([str(STDLIB / "json" / "decoder.py")], ds, val_fraction=0.0,
                    progress=False)
    return on_data(x, ds)


def resume(x: Inputs, run_dir: Path, *overrides: str) -> list[str]:
    # train.steps=3: a run already at train.steps with a summary is complete, and is not
    # restored at all
    return on_data(x, x.data, f"run_dir={run_dir}", "train.steps=3", *overrides)


def damage_state(x: Inputs, how: Callable[[Path], None]) -> list[str]:
    """`how` applied to every data file of checkpoint 2's state item."""
    run_dir = x.run()
    files = [p for p in (run_dir / "checkpoints" / "2" / "state").rglob("*")
             if p.is_file() and p.parent.name == "d"]
    assert files
    for path in files:
        how(path)
    return resume(x, run_dir)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garble(path: Path) -> None:
    path.write_bytes(b"\x13\x37garbage" * 64)


def without_item(x: Inputs, item: str) -> list[str]:
    run_dir = x.run()
    shutil.rmtree(run_dir / "checkpoints" / "2" / item)
    return resume(x, run_dir)


def garbled_meta(x: Inputs) -> list[str]:
    run_dir = x.run()
    (run_dir / "checkpoints" / "2" / "meta" / "metadata").write_bytes(b"\x00{oops")
    return resume(x, run_dir)


def prepare(x: Inputs, *args: str) -> list[str]:
    return ["prepare-data", *args, "--out", str(x.tmp / "out")]


def text(x: Inputs) -> str:
    return str(x.write("a.txt", "hello world\n"))


def spec(x: Inputs, body: dict | str) -> list[str]:
    """`spjax sweep SPEC --dry-run` of a spec with `body` (a dict: base tiny.yaml and an out
    folder under tmp added)."""
    if isinstance(body, dict):
        body = yaml.safe_dump({"base": TINY_YAML, "out": str(x.tmp / "runs"), **body},
                              sort_keys=False)
    return ["sweep", str(x.write("spec.yaml", body)), "--dry-run"]


GOOD_ROWS = [{"params": n, "tokens": d, "loss": 2 + 100 / n ** 0.3 + 300 / d ** 0.3}
             for n in (1e6, 3e6, 1e7) for d in (1e8, 1e9)]


def table(x: Inputs, rows: list[dict]) -> str:
    path = x.tmp / "runs.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def fit(path: str | Path, *options: str) -> list[str]:
    return ["fit", str(path), "--bootstrap", "0", "--starts", "2", "--no-plots", *options]


ROWS = [
    # ------------------------------------------------------------- train: unknown keys
    Row("unknown-section", lambda x: train(x, "trian.steps=3"), "'trian'"),
    Row("unknown-model-key", lambda x: train(x, "model.d_modle=64"), "model.d_modle"),
    Row("unknown-data-key", lambda x: train(x, "data.seqlen=64"), "data.seqlen"),
    Row("unknown-optimizer-key", lambda x: train(x, "optimizer.learning_rate=0.1"),
        "optimizer.learning_rate"),
    Row("unknown-train-key", lambda x: train(x, "train.stpes=5"), "train.stpes"),
    Row("unknown-parallel-key", lambda x: train(x, "parallel.dp=2"), "parallel.dp"),
    Row("unknown-sparsity-key", lambda x: train(x, "sparsity.sparsty=0.5"),
        "sparsity.sparsty"),
    Row("unknown-lowrank-key", lambda x: train(x, "lowrank.rnk=4"), "lowrank.rnk"),
    Row("unknown-moe-key", lambda x: train(x, "model.moe.experts=4"), "model.moe.experts"),
    # ------------------------------------------------------------- train: types and ranges
    Row("int-not-a-number", lambda x: train(x, "train.steps=abc"), "train.steps"),
    Row("int-given-a-float", lambda x: train(x, "data.batch_size=1.5"), "data.batch_size"),
    Row("int-beyond-64-bits", lambda x: train(x, f"train.seed={2**70}"), "train.seed"),
    Row("bool-not-a-bool", lambda x: train(x, "train.progress=maybe"), "train.progress"),
    Row("float-not-a-number", lambda x: train(x, "optimizer.lr=fast"), "optimizer.lr"),
    Row("float-not-finite", lambda x: train(x, "optimizer.lr=nan"), "optimizer.lr"),
    Row("section-given-a-scalar", lambda x: train(x, "data=5"), "'data'"),
    Row("list-given-a-scalar", lambda x: train(x, "parallel.rules=5"), "parallel.rules"),
    Row("literal-not-a-choice", lambda x: train(x, "optimizer.name=sgd"), "optimizer.name"),
    Row("sparsity-method-unknown", lambda x: train(x, "sparsity.method=magic"),
        "sparsity.method"),
    Row("seq-len-zero", lambda x: train(x, "data.seq_len=0"), "data.seq_len"),
    Row("lr-negative", lambda x: train(x, "optimizer.lr=-1"), "optimizer.lr"),
    Row("b1-out-of-range", lambda x: train(x, "optimizer.b1=1.5"), "optimizer.b1"),
    Row("steps-zero", lambda x: train(x, "train.steps=0"), "train.steps"),
    Row("fsdp-zero", lambda x: train(x, "parallel.fsdp=0"), "parallel.fsdp"),
    Row("rope-theta-negative", lambda x: train(x, "model.rope_theta=-1"), "model.rope_theta"),
    Row("sparsity-above-one",
        lambda x: train(x, "sparsity.method=static", "sparsity.sparsity=1.5"),
        "sparsity.sparsity"),
    Row("heads-do-not-divide-width", lambda x: train(x, "model.n_heads=3"), "model.n_heads"),
    Row("num-workers-negative", lambda x: train(x, "data.num_workers=-1"), "data.num_workers"),
    Row("experts-not-divisible",
        lambda x: train(x, "model=moe_tiny", "parallel.expert=3",
                        "model.moe.capacity_factor=0"), "parallel.expert"),
    Row("rules-bad-regex", lambda x: train(x, 'parallel.rules=[["(", null]]'),
        "parallel.rules[0]"),
    Row("rules-unknown-mesh-axis",
        lambda x: on_data(x, x.data, 'parallel.rules=[["batch", "nope"], [".*", null]]'),
        "parallel.rules[0]"),
    Row("batch-not-divisible-by-devices", lambda x: on_data(x, x.data, "data.batch_size=3"),
        "data.batch_size"),
    # ------------------------------------------------------------- train: presets, syntax, files
    Row("model-preset-unknown", lambda x: train(x, "model=huge"), "'huge'"),
    Row("sparsity-preset-unknown", lambda x: train(x, "sparsity=magic"), "'magic'"),
    Row("lowrank-preset-unknown", lambda x: train(x, "lowrank=svd9"), "'svd9'"),
    Row("preset-file-is-a-list",
        lambda x: train(x, f"model={x.write('preset.yaml', '- 1\n- 2\n')}"), "preset.yaml"),
    Row("override-without-equals", lambda x: train(x, "train.steps"), "'train.steps'"),
    Row("override-without-key", lambda x: train(x, "=5"), "'=5'"),
    Row("override-into-a-scalar", lambda x: train(x, "run_dir.x=1"), "'run_dir'"),
    Row("override-value-bad-yaml", lambda x: train(x, "parallel.rules=[[a, b"),
        "parallel.rules"),
    Row("config-missing", lambda x: train(x, config=str(x.tmp / "nope.yaml")), "nope.yaml"),
    Row("config-bad-yaml",
        lambda x: train(x, config=str(x.write("bad.yaml", "model:\n  d_model: [1, 2\n"))),
        "bad.yaml"),
    Row("config-is-a-list",
        lambda x: train(x, config=str(x.write("list.yaml", "- a\n- b\n"))), "list.yaml"),
    Row("config-is-binary",
        lambda x: train(x, config=str(x.write("bin.yaml", b"\xff\xfe\x00a"))), "bin.yaml"),
    Row("config-is-a-directory", lambda x: train(x, config=str(x.folder("confdir"))),
        "confdir' is a directory"),
    # ------------------------------------------------------------- train: data and run dir
    Row("data-path-missing", lambda x: on_data(x, x.tmp / "nodata"), "nodata"),
    Row("data-path-is-a-file", lambda x: on_data(x, x.write("file.txt", "hello")),
        "file.txt"),
    Row("data-path-not-prepared", lambda x: on_data(x, x.write("raw/a.txt", "hi").parent),
        "meta.json"),
    Row("data-meta-not-json", meta_not_json, "meta.json"),
    Row("data-meta-without-vocab", lambda x: edit_meta(x, lambda m: m.pop("vocab_size")),
        "vocab_size"),
    Row("data-meta-vocab-not-a-number",
        lambda x: edit_meta(x, lambda m: m.update(vocab_size="many")), "vocab_size"),
    Row("data-meta-without-splits", lambda x: edit_meta(x, lambda m: m.pop("splits")),
        "splits"),
    Row("data-shard-missing", shard_missing, "00000.bin"),
    Row("data-too-small-for-a-batch", lambda x: on_data(x, x.data, "data.batch_size=4096"),
        "data.batch_size"),
    Row("data-val-split-empty", no_val_split, "val split"),
    Row("vocab-smaller-than-data", lambda x: on_data(x, x.data, "model.vocab_size=100"),
        "model.vocab_size"),
    Row("run-dir-is-a-file", lambda x: train(x, f"run_dir={x.write('taken', 'x')}"),
        "taken is a file"),
    Row("run-dir-under-a-file",
        lambda x: train(x, f"run_dir={x.write('plain', 'x') / 'run'}"), "plain is a file"),
    # ------------------------------------------------------------- train: checkpoints
    Row("checkpoint-of-another-model", lambda x: resume(x, x.run(), "model.d_model=64"),
        "model.d_model"),
    Row("checkpoint-of-another-seq-len", lambda x: resume(x, x.run(), "data.seq_len=64"),
        "data.seq_len"),
    Row("checkpoint-state-truncated", lambda x: damage_state(x, truncate),
        "checkpoints/2 is corrupt"),
    Row("checkpoint-state-garbage", lambda x: damage_state(x, garble),
        "checkpoints/2 is corrupt"),
    Row("checkpoint-state-missing", lambda x: without_item(x, "state"),
        "checkpoints/2 is corrupt"),
    Row("checkpoint-meta-missing", lambda x: without_item(x, "meta"),
        "checkpoints/2 is corrupt"),
    Row("checkpoint-meta-garbage", garbled_meta, "checkpoints/2 is corrupt"),
    Row("init-from-missing",
        lambda x: on_data(x, x.data, f"train.init_from={x.tmp / 'nowhere'}"),
        "train.init_from"),
    Row("init-from-another-model",
        lambda x: on_data(x, x.data, f"train.init_from={x.run()}", "model.d_model=64"),
        "train.init_from"),
    # ------------------------------------------------------------- prepare-data
    Row("prepare-input-missing", lambda x: prepare(x, str(x.tmp / "gone.txt")), "gone.txt"),
    Row("prepare-input-empty", lambda x: prepare(x, str(x.write("empty.txt", ""))),
        "empty.txt"),
    Row("prepare-input-binary",
        lambda x: prepare(x, str(x.write("blob.bin", bytes(range(256)) * 4))), "blob.bin"),
    Row("prepare-input-not-utf8",
        lambda x: prepare(x, str(x.write("latin.txt", "caf\xe9 ol\xe9".encode("latin-1")))),
        "latin.txt"),
    Row("prepare-input-bad-gzip", lambda x: prepare(x, str(x.write("a.txt.gz", "plain"))),
        "a.txt.gz"),
    Row("prepare-empty-directory", lambda x: prepare(x, str(x.folder("void"))), "void"),
    Row("prepare-glob-matches-nothing", lambda x: prepare(x, str(x.tmp / "none-*.txt")),
        "none-*.txt"),
    Row("prepare-jsonl-bad-line",
        lambda x: prepare(x, str(x.write("docs.jsonl", '{"text": "a"}\n{oops\n'))),
        "docs.jsonl:2"),
    Row("prepare-jsonl-no-text-field",
        lambda x: prepare(x, str(x.write("docs.jsonl", '{"body": "a"}\n'))), "'text'"),
    Row("prepare-out-exists",
        lambda x: [*prepare(x, text(x)), "--out", str(x.write("out/keep.txt", "").parent)],
        "--overwrite"),
    Row("prepare-out-under-a-file",
        lambda x: [*prepare(x, text(x)), "--out", str(x.write("plain", "x") / "ds")],
        "plain is a file"),
    Row("prepare-tokenizer-missing",
        lambda x: prepare(x, text(x), "--tokenizer", str(x.tmp / "tok.json")), "tok.json"),
    Row("prepare-tokenizer-is-a-directory",
        lambda x: prepare(x, text(x), "--tokenizer", str(x.folder("tokdir"))),
        "tokdir: a directory"),
    Row("prepare-tokenizer-not-json",
        lambda x: prepare(x, text(x), "--tokenizer", str(x.write("tok.json", "not json"))),
        "tok.json"),
    Row("prepare-tokenizer-json-not-a-tokenizer",
        lambda x: prepare(x, text(x), "--tokenizer", str(x.write("tok.json", "{}"))),
        "tok.json"),
    Row("prepare-tokenizer-unknown-name",
        lambda x: prepare(x, text(x), "--tokenizer", "gpt5"), "'gpt5'"),
    Row("prepare-val-fraction-out-of-range",
        lambda x: prepare(x, text(x), "--val-fraction", "0.9"), "val_fraction"),
    Row("prepare-bpe-vocab-too-small",
        lambda x: prepare(x, text(x), "--tokenizer", "bpe", "--vocab-size", "10"),
        "--vocab-size"),
    Row("prepare-seed-beyond-64-bits",
        lambda x: prepare(x, text(x), "--seed", str(2**70)), "seed"),
    # ------------------------------------------------------------- sweep
    Row("sweep-spec-missing", lambda x: ["sweep", str(x.tmp / "nospec.yaml"), "--dry-run"],
        "nospec.yaml"),
    Row("sweep-spec-is-a-directory", lambda x: ["sweep", str(x.folder("specs"))],
        "specs' is a directory"),
    Row("sweep-spec-bad-yaml", lambda x: spec(x, "grid: {train.steps: [1, 2\n"), "spec.yaml"),
    Row("sweep-spec-is-a-list", lambda x: spec(x, "- base\n"), "spec.yaml"),
    Row("sweep-unknown-key", lambda x: spec(x, {"grids": {"train.steps": [1]}}), "'grids'"),
    Row("sweep-base-missing", lambda x: spec(x, {"base": "absent.yaml"}), "absent.yaml"),
    Row("sweep-base-bad-yaml", lambda x: spec(x, {"base": str(x.write("b.yaml", "a: [\n"))}),
        "b.yaml"),
    Row("sweep-empty-grid-axis", lambda x: spec(x, {"grid": {"train.steps": []}}),
        "grid.train.steps"),
    Row("sweep-grid-not-a-mapping", lambda x: spec(x, {"grid": ["train.steps"]}), "'grid'"),
    Row("sweep-zip-unequal",
        lambda x: spec(x, {"zip": {"model.d_model": [32, 64], "model.d_ff": [96]}}),
        "model.d_ff: 1"),
    Row("sweep-swept-key-typo", lambda x: spec(x, {"grid": {"train.stepz": [1, 2]}}),
        "train.stepz"),
    Row("sweep-swept-value-invalid", lambda x: spec(x, {"grid": {"data.seq_len": [64, -1]}}),
        "data.seq_len"),
    Row("sweep-slurm-unknown-key", lambda x: spec(x, {"slurm": {"gpus": 1}}), "slurm.gpus"),
    Row("sweep-overrides-entry-bad", lambda x: spec(x, {"overrides": ["train.steps"]}),
        "'train.steps'"),
    Row("sweep-parallel-zero", lambda x: [*spec(x, {})[:2], "--parallel", "0"],
        "--parallel"),
    Row("sweep-collect-without-spec", lambda x: ["sweep", "collect"], "collect SPEC"),
    # ------------------------------------------------------------- fit
    Row("fit-table-missing", lambda x: fit(x.tmp / "none.csv"), "none.csv"),
    Row("fit-table-is-a-directory", lambda x: fit(x.folder("tables")),
        "tables' is a directory"),
    Row("fit-table-empty", lambda x: fit(x.write("runs.csv", "")), "runs.csv"),
    Row("fit-column-missing",
        lambda x: fit(table(x, [{k: v for k, v in r.items() if k != "tokens"}
                                for r in GOOD_ROWS])), "'tokens'"),
    Row("fit-value-not-a-number",
        lambda x: fit(table(x, [*GOOD_ROWS[:-1], {**GOOD_ROWS[-1], "loss": "n/a"}])),
        "'loss'"),
    Row("fit-value-negative",
        lambda x: fit(table(x, [{**GOOD_ROWS[0], "params": -5}, *GOOD_ROWS[1:]])),
        "'params'"),
    Row("fit-too-few-rows", lambda x: fit(table(x, GOOD_ROWS[:3])), "3 runs"),
    Row("fit-one-model-size",
        lambda x: fit(table(x, [{**r, "params": 1e6} for r in GOOD_ROWS])), "'params'"),
    Row("fit-not-csv-binary", lambda x: fit(x.write("runs.csv", bytes(range(256)) * 4)),
        "runs.csv"),
    Row("fit-not-csv-json", lambda x: fit(x.write("runs.csv", json.dumps(GOOD_ROWS))),
        "'params'"),
    Row("fit-avg-params-column-missing",
        lambda x: fit(table(x, GOOD_ROWS), "--law", "avg-params"), "'avg_params'"),
    Row("fit-where-unknown-column",
        lambda x: fit(table(x, GOOD_ROWS), "--where", "method=none"), "'method'"),
    Row("fit-where-bad-syntax", lambda x: fit(table(x, GOOD_ROWS), "--where", "method"),
        "--where"),
    Row("fit-exclude-negative",
        lambda x: fit(table(x, GOOD_ROWS), "--exclude-top-loss", "-1"), "--exclude-top-loss"),
    Row("fit-out-under-a-file",
        lambda x: fit(table(x, GOOD_ROWS), "--out", str(x.write("plain", "x") / "fit.json")),
        "plain is a file"),
]


def test_the_table_is_broad():
    ids = [row.id for row in ROWS]
    assert len(ids) == len(set(ids)) and len(ids) >= 40


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_bad_input_is_one_line_naming_the_culprit(row, tmp_path, request, capsys):
    argv = row.build(Inputs(tmp_path, request))
    capsys.readouterr()  # whatever building printed (the finished run's own output)
    code = main(argv)  # an uncaught exception fails the row here, traceback and all
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.splitlines()  # splits at \r too: a progress bar frame is a line of its own
    assert code == 2 and len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith("spjax: error: "), err
    assert row.needle in lines[0], lines[0]
