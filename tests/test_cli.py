"""The `spjax` command line: prepare-data end to end, and one-line errors for bad input."""

import json
import sysconfig
from pathlib import Path

import pytest

from spjax.cli import main

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def test_prepare_data_from_a_directory_and_a_jsonl_file(tmp_path, capsys):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": (STDLIB / f"{m}.py").read_text()}) + "\n"
                            for m in ("heapq", "bisect", "shlex", "textwrap")))
    out = tmp_path / "ds"
    code = main(["prepare-data", str(STDLIB / "json"), str(docs), "--out", str(out),
                 "--val-fraction", "0.2"])
    assert code == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["vocab_size"] == 257 and meta["splits"]["val"]["tokens"] > 0
    printed = capsys.readouterr().out
    assert f"train {meta['splits']['train']['tokens']:,}" in printed  # the counts, not "{}"
    assert f"val {meta['splits']['val']['tokens']:,}" in printed


@pytest.mark.parametrize("make_input, needle", [
    (lambda d: d / "missing.txt", "missing.txt"),
    (lambda d: (d / "empty.txt").write_text("") and None or d / "empty.txt", "empty.txt"),
    (lambda d: (d / "blob.bin").write_bytes(bytes(range(256)) * 8) and None or d / "blob.bin",
     "blob.bin"),
    (lambda d: d / "nothing-*.txt", "nothing-*.txt"),
])
def test_prepare_data_bad_input_is_one_line_naming_the_file(tmp_path, capsys, make_input,
                                                            needle):
    path = make_input(tmp_path)
    code = main(["prepare-data", str(path), "--out", str(tmp_path / "ds")])
    err = capsys.readouterr().err
    last = err.splitlines()[-1]  # progress bars may precede it, on their own lines
    assert code == 2 and "Traceback" not in err and err.endswith("\n")
    assert last.startswith("spjax: error: ") and needle in last
    assert not (tmp_path / "ds").exists()


def test_unknown_command_and_missing_arguments_exit_with_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["fly"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["prepare-data", "x"])
    assert "--out" in capsys.readouterr().err


def test_dry_run_prints_memory_per_structure_and_trains_nothing(tmp_path, capsys):
    from spjax.config import CONFIGS_DIR

    run_dir = tmp_path / "run"
    code = main(["train", str(CONFIGS_DIR / "tiny.yaml"), "--dry-run", "lowrank=sltrain",
                 "lowrank.rank=16", f"run_dir={run_dir}"])
    out = capsys.readouterr().out
    assert code == 0
    assert "sltrain" in out and "optimizer MiB" in out and "total" in out
    assert not run_dir.exists()
