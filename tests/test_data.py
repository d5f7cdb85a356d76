"""Data package: sources, tokenizers, prepare (shards + meta), default corpus. The grain
pipelines are tested in test_data_pipeline.py.

The corpus is real text (standard-library modules), never zeros: a pipeline that mixes up
offsets, or a tokenizer that drops bytes, shows up as a mismatch against the source.
"""

import json
import math
import os
import shutil
import sysconfig
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from spjax.data import (
    ByteTokenizer,
    HFTokenizer,
    TokenWindows,
    default_dataset,
    load_meta,
    load_tokenizer,
    prepare_dataset,
    stdlib_inputs,
    train_bpe,
    train_iterator,
)
from spjax.data import prepare as prepare_mod
from spjax.data import sources as sources_mod
from spjax.errors import DataError

STDLIB = Path(sysconfig.get_paths()["stdlib"])
MODULES = ["textwrap", "heapq", "bisect", "shlex", "glob", "fnmatch", "colorsys", "keyword",
           "string", "copy", "fractions", "graphlib"]
UNICODE = "naïve café — 日本語テキスト, emoji 🚀🐍, Ελληνικά, العربية\n\ttabs & NUL-free\r\n"


def _texts() -> dict[str, str]:
    return {m: (STDLIB / f"{m}.py").read_text() for m in MODULES}


@pytest.fixture
def corpus(tmp_path) -> Path:
    """A directory of real text files (plus things a walk must skip)."""
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    for i, (m, text) in enumerate(_texts().items()):
        (d / ("sub" if i % 2 else "") / f"{m}.py").write_text(text)
    (d / "notes.txt").write_text(UNICODE * 20)
    (d / ".git").mkdir()
    (d / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (d / "__pycache__").mkdir()
    (d / "__pycache__" / "x.cpython-312.pyc").write_bytes(b"\x00\xcb\r\n" * 100)
    (d / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    return d


def _stream(path: Path, split: str) -> np.ndarray:
    meta = load_meta(path)
    parts = [np.fromfile(path / s, meta["dtype"]) for s in meta["splits"][split]["shards"]]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def _docs(path: Path, split: str) -> list[str]:
    """The split's documents, decoded: the stream cut at EOS."""
    tok, ids = load_tokenizer(path), _stream(path, split)
    assert ids[-1] == tok.eos_id  # every document ends with EOS
    cuts = np.flatnonzero(ids == tok.eos_id)
    return [tok.decode(ids[a + 1 if i else 0:b]) for i, (a, b) in enumerate(zip(np.r_[0, cuts[:-1]], cuts))]


def _check_sizes(path: Path, meta: dict) -> None:
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in ("train", "val"):
        info = meta["splits"][split]
        sizes = [(path / s).stat().st_size for s in info["shards"]]
        assert sizes == [n * itemsize for n in info["shard_tokens"]]
        assert sum(sizes) == info["tokens"] * itemsize


# ---------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip_and_ids():
    tok = ByteTokenizer()
    text = _texts()["textwrap"][:3000] + UNICODE
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.max() < 256 and len(ids) == len(text.encode())
    assert tok.decode(ids) == text
    assert tok.decode(np.r_[ids, tok.eos_id]) == text  # EOS is dropped, not rendered
    assert (tok.vocab_size, tok.eos_id) == (257, 256)


def test_bpe_train_round_trip_and_reload(tmp_path):
    texts = list(_texts().values())
    tok = train_bpe(texts, vocab_size=600)
    assert tok.vocab_size == 600 and tok.decode([tok.eos_id]) == ""
    unseen = (STDLIB / "calendar.py").read_text()[:5000] + UNICODE
    ids = tok.encode(unseen)
    assert tok.decode(ids) == unseen
    assert len(ids) < 0.6 * len(unseen.encode())  # merges learned something
    tok.save(tmp_path / "tokenizer.json")
    again = HFTokenizer.from_file(tmp_path / "tokenizer.json")
    assert np.array_equal(again.encode(unseen), ids) and again.eos_id == tok.eos_id


def test_hf_tokenizer_without_eos_gets_one_added(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    raw = Tokenizer(models.WordLevel({"[UNK]": 0, "def": 1, "return": 2, "x": 3}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.save(str(tmp_path / "tokenizer.json"))
    tok = HFTokenizer.from_file(tmp_path / "tokenizer.json")
    assert (tok.eos_token, tok.eos_id, tok.vocab_size) == ("<|endoftext|>", 4, 5)
    assert list(tok.encode("def x return")) == [1, 3, 2]


# ---------------------------------------------------------------- prepare


def test_prepare_single_text_file_cuts_val_at_a_line_and_round_trips(tmp_path):
    text = _texts()["textwrap"]
    (tmp_path / "a.txt").write_text(text)
    meta = prepare_dataset([str(tmp_path / "a.txt")], tmp_path / "ds", val_fraction=0.1, progress=False)
    out = tmp_path / "ds"
    _check_sizes(out, meta)
    (train,), (val,) = _docs(out, "train"), _docs(out, "val")
    assert train + val == text and train.endswith("\n")
    assert 0.05 < len(val) / len(text) < 0.15
    assert meta["splits"]["train"]["tokens"] == len(train.encode()) + 1
    assert (meta["vocab_size"], meta["eos_id"], meta["dtype"]) == (257, 256, "uint16")


def test_prepare_glob_takes_only_matches(corpus, tmp_path):
    meta = prepare_dataset([str(corpus / "**" / "*.py")], tmp_path / "ds", progress=False)
    docs = _docs(tmp_path / "ds", "train") + _docs(tmp_path / "ds", "val")
    assert sorted(docs) == sorted(_texts().values())
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == len(MODULES)
    assert meta["inputs"] == [str(corpus / "**" / "*.py")]


def test_prepare_directory_skips_hidden_cache_and_binary(corpus, tmp_path):
    with pytest.warns(UserWarning, match=r"skipped 1 files: 1 binary.*logo\.png"):
        meta = prepare_dataset([str(corpus)], tmp_path / "ds", val_fraction=0.2, progress=False)
    docs = _docs(tmp_path / "ds", "train") + _docs(tmp_path / "ds", "val")
    assert sorted(docs) == sorted([*_texts().values(), UNICODE * 20])
    assert meta["num_files"] == len(MODULES) + 2  # .git and __pycache__ are never listed
    _check_sizes(tmp_path / "ds", meta)


def test_prepare_jsonl_one_document_per_line(tmp_path):
    paragraphs = [p for p in _texts()["shlex"].split("\n\n") if p.strip()]
    lines = [json.dumps({"text": p, "id": i}) for i, p in enumerate(paragraphs)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines[:5]) + "\n\n" + "\n".join(lines[5:]) + "\n")
    meta = prepare_dataset([str(tmp_path / "d.jsonl")], tmp_path / "ds", val_fraction=0.1, progress=False)
    train, val = _docs(tmp_path / "ds", "train"), _docs(tmp_path / "ds", "val")
    assert sorted(train + val) == sorted(paragraphs)
    assert (meta["splits"]["train"]["documents"], meta["splits"]["val"]["documents"]) == (len(train), len(val))


def test_val_split_is_disjoint_from_train_at_document_level(tmp_path):
    # Unique documents of varying length; order in the file says nothing about the split.
    src = _texts()["fractions"].splitlines()
    docs = [f"doc {i}: " + "\n".join(src[i:i + 1 + i % 7]) for i in range(300)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    meta = prepare_dataset([str(tmp_path / "d.jsonl")], tmp_path / "ds", val_fraction=0.2, seed=3, progress=False)
    train, val = set(_docs(tmp_path / "ds", "train")), set(_docs(tmp_path / "ds", "val"))
    assert train.isdisjoint(val) and train | val == set(docs)
    assert 30 <= len(val) <= 90  # ~20% of 300
    again = prepare_dataset([str(tmp_path / "d.jsonl")], tmp_path / "ds2", val_fraction=0.2, seed=4, progress=False)
    assert set(_docs(tmp_path / "ds2", "val")) != val  # the seed chooses the split
    assert meta["splits"]["val"]["documents"] == len(val) and again["seed"] == 4


def test_two_documents_always_give_nonempty_train_and_val(tmp_path):
    for seed in range(6):  # at val_fraction 0.5 both may hash to one side; the plan fixes that
        (tmp_path / "a.txt").write_text(_texts()["heapq"])
        (tmp_path / "b.txt").write_text(_texts()["bisect"])
        out = tmp_path / f"ds{seed}"
        meta = prepare_dataset([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], out, val_fraction=0.5, seed=seed, progress=False)
        assert meta["splits"]["train"]["documents"] == meta["splits"]["val"]["documents"] == 1


def test_unigram_entropy_matches_direct_computation(corpus, tmp_path):
    with pytest.warns(UserWarning):
        meta = prepare_dataset([str(corpus)], tmp_path / "ds", progress=False)
    counts = Counter(_stream(tmp_path / "ds", "train").tolist())
    total = sum(counts.values())
    direct = -sum(c / total * math.log(c / total) for c in counts.values())
    assert meta["unigram_entropy_nats"] == pytest.approx(direct, rel=1e-9)
    assert 2.0 < direct < math.log(257)


def test_prepare_with_bpe_and_with_a_tokenizer_file(corpus, tmp_path):
    with pytest.warns(UserWarning):
        meta = prepare_dataset([str(corpus)], tmp_path / "bpe", tokenizer="bpe", bpe_vocab_size=500, progress=False)
    assert meta["tokenizer"]["kind"] == "hf" and meta["vocab_size"] == 500
    assert (tmp_path / "bpe" / "tokenizer.json").is_file()
    docs = _docs(tmp_path / "bpe", "train") + _docs(tmp_path / "bpe", "val")
    assert sorted(docs) == sorted([*_texts().values(), UNICODE * 20])
    _check_sizes(tmp_path / "bpe", meta)
    with pytest.warns(UserWarning):
        meta2 = prepare_dataset([str(corpus)], tmp_path / "file", tokenizer=str(tmp_path / "bpe" / "tokenizer.json"), progress=False)
    assert meta2["eos_id"] == meta["eos_id"]
    assert np.array_equal(_stream(tmp_path / "file", "train"), _stream(tmp_path / "bpe", "train"))


def test_many_shards_concatenate_to_the_same_stream(corpus, tmp_path):
    with pytest.warns(UserWarning):
        one = prepare_dataset([str(corpus)], tmp_path / "one", progress=False)
    with pytest.warns(UserWarning):
        many = prepare_dataset([str(corpus)], tmp_path / "many", progress=False, shard_tokens=10_000)
    shards = many["splits"]["train"]["shards"]
    assert len(shards) > 5 and shards[1] == "train/00001.bin"
    assert max(many["splits"]["train"]["shard_tokens"]) == 10_000
    assert np.array_equal(_stream(tmp_path / "one", "train"), _stream(tmp_path / "many", "train"))
    assert one["unigram_entropy_nats"] == many["unigram_entropy_nats"]
    w1, w2 = TokenWindows(tmp_path / "one", "train", 64), TokenWindows(tmp_path / "many", "train", 64)
    for i in range(len(w1)):  # every window, including those straddling shard boundaries
        assert np.array_equal(w1[i]["inputs"], w2[i]["inputs"])


# ---------------------------------------------------------------- user errors


def _one_line(err: pytest.ExceptionInfo, *needles: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg


def test_error_missing_path(tmp_path):
    with pytest.raises(DataError) as e:
        prepare_dataset([str(tmp_path / "nope.txt")], tmp_path / "ds", progress=False)
    _one_line(e, "nope.txt", "no such file")


def test_error_glob_without_match(tmp_path):
    with pytest.raises(DataError) as e:
        prepare_dataset([str(tmp_path / "*.md")], tmp_path / "ds", progress=False)
    _one_line(e, "*.md", "matched no files")


def test_error_empty_file_and_empty_dir(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError) as e:
        prepare_dataset([str(tmp_path / "empty.txt")], tmp_path / "ds", progress=False)
    _one_line(e, "empty.txt", "empty")
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError) as e:
        prepare_dataset([str(tmp_path / "d")], tmp_path / "ds", progress=False)
    _one_line(e, str(tmp_path / "d"), "no files")


def test_error_binary_and_non_utf8_file(tmp_path):
    (tmp_path / "model.bin").write_bytes(np.arange(4096, dtype=np.int32).tobytes())
    with pytest.raises(DataError) as e:
        prepare_dataset([str(tmp_path / "model.bin")], tmp_path / "ds", progress=False)
    _one_line(e, "model.bin", "binary")
    (tmp_path / "latin1.txt").write_bytes("café crème brûlée\n".encode("latin-1") * 50)
    with pytest.raises(DataError) as e:
        prepare_dataset([str(tmp_path / "latin1.txt")], tmp_path / "ds", progress=False)
    _one_line(e, "latin1.txt", "UTF-8")


def test_error_unreadable_file(tmp_path, monkeypatch):
    p = tmp_path / "secret.txt"
    p.write_text(_texts()["glob"])
    p.chmod(0)
    try:
        if os.access(p, os.R_OK):  # root reads anything: make open() fail as it would for a user
            real_open = sources_mod._open

            def denied(path):
                if path == p:
                    raise PermissionError(13, "Permission denied", str(path))
                return real_open(path)

            monkeypatch.setattr(sources_mod, "_open", denied)
        with pytest.raises(DataError) as e:
            prepare_dataset([str(p)], tmp_path / "ds", progress=False)
        _one_line(e, "secret.txt", "permission")
    finally:
        p.chmod(0o644)


@pytest.mark.parametrize("line, needle", [
    ('{"content": "def f(): pass"}', "no 'text'"),
    ('{"text": 3}', "no 'text'"),
    ('{"text": "unterminated', "not valid JSON"),
    ('["text"]', "no 'text'"),
])
def test_error_bad_jsonl_names_file_and_line(tmp_path, line, needle):
    good = json.dumps({"text": _texts()["keyword"]})
    (tmp_path / "d.jsonl").write_text(f"{good}\n{good}\n{line}\n{good}\n")
    with pytest.raises(DataError) as e:
        prepare_dataset([str(tmp_path / "d.jsonl")], tmp_path / "ds", progress=False)
    _one_line(e, "d.jsonl:3:", needle)


def test_error_bad_arguments(tmp_path, corpus):
    with pytest.raises(DataError) as e:
        prepare_dataset([str(corpus)], tmp_path / "ds", val_fraction=0.7, progress=False)
    _one_line(e, "val_fraction", "[0, 0.5]")
    with pytest.raises(DataError) as e:
        prepare_dataset([str(corpus)], tmp_path / "ds", tokenizer="wordpiece", progress=False)
    _one_line(e, "wordpiece", "'byte', 'bpe'")
    with pytest.raises(DataError) as e:
        prepare_dataset([str(corpus)], tmp_path / "ds", tokenizer=str(tmp_path / "tok.json"), progress=False)
    _one_line(e, "tok.json", "not found")


def test_refuses_to_overwrite_and_failure_leaves_nothing(corpus, tmp_path, monkeypatch):
    out = tmp_path / "out" / "ds"
    with pytest.warns(UserWarning):
        first = prepare_dataset([str(corpus)], out, progress=False)
    with pytest.raises(DataError) as e:
        prepare_dataset([str(corpus / "notes.txt")], out, progress=False)
    _one_line(e, str(out), "--overwrite")
    assert load_meta(out) == first

    def boom(self, ids):
        raise KeyboardInterrupt  # e.g. Ctrl-C halfway through writing shards

    monkeypatch.setattr(prepare_mod._ShardWriter, "write", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset([str(corpus / "notes.txt")], out, overwrite=True, progress=False)
    assert load_meta(out) == first  # the old dataset is untouched
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset([str(corpus / "notes.txt")], tmp_path / "out" / "new", progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ds"]  # no temp dirs, no half dataset
    monkeypatch.undo()
    meta = prepare_dataset([str(corpus / "notes.txt")], out, overwrite=True, progress=False)
    assert meta["num_files"] == 1 and load_meta(out) == meta


def test_load_meta_rejects_missing_and_truncated(corpus, tmp_path):
    with pytest.raises(DataError) as e:
        load_meta(tmp_path / "nothing")
    _one_line(e, "nothing", "spjax prepare-data")
    with pytest.warns(UserWarning):
        prepare_dataset([str(corpus)], tmp_path / "ds", progress=False)
    shard = tmp_path / "ds" / "train" / "00000.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[:-2])
    with pytest.raises(DataError) as e:
        load_meta(tmp_path / "ds")
    _one_line(e, "00000.bin", "truncated", "spjax prepare-data")
    shard.unlink()
    with pytest.raises(DataError) as e:
        TokenWindows(tmp_path / "ds", "train", 16)
    _one_line(e, "00000.bin", "missing")
    (tmp_path / "ds" / "meta.json").unlink()
    with pytest.raises(DataError) as e:
        load_meta(tmp_path / "ds")
    _one_line(e, "meta.json", "spjax prepare-data")


# ---------------------------------------------------------------- pipeline


def test_stdlib_inputs_are_sorted_utf8_python_outside_site_packages():
    files = stdlib_inputs()
    assert len(files) > 500 and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts for f in files)
    rel = [f.relative_to(STDLIB).as_posix() for f in files]
    assert rel == sorted(rel) and "textwrap.py" in rel and "json/decoder.py" in rel


def test_default_dataset_builds_once_and_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("SPJAX_CACHE", str(tmp_path / "cache"))
    path = default_dataset(progress=False)
    assert path == tmp_path / "cache" / "datasets" / path.name and path.name.startswith("stdlib-py3")
    meta = load_meta(path)
    train = meta["splits"]["train"]
    assert train["tokens"] > 10_000_000 and meta["splits"]["val"]["tokens"] > 50_000
    assert 2.5 < meta["unigram_entropy_nats"] < 4.5  # ASCII source code, well below ln(257)
    stamp = (path / "meta.json").stat().st_mtime_ns
    monkeypatch.setattr(prepare_mod, "_prepare", lambda *a, **k: pytest.fail("rebuilt a valid cache"))
    assert default_dataset(progress=False) == path and (path / "meta.json").stat().st_mtime_ns == stamp
    batch = next(train_iterator(path, 128, 4, seed=0, process_index=0, process_count=1))
    stream = b"".join((path / s).read_bytes() for s in train["shards"])
    at = stream.find(batch["targets"][0].astype("<u2").tobytes())
    assert at >= 0 and at % 2 == 0  # a real slice of the stdlib token stream


def test_default_dataset_race_two_builders_one_winner(tmp_path, monkeypatch):
    # Both callers build (a small stand-in corpus) and reach the rename together.
    monkeypatch.setattr(prepare_mod, "stdlib_inputs", lambda: [STDLIB / f"{m}.py" for m in MODULES])
    barrier, build = threading.Barrier(2, timeout=30), prepare_mod._build

    def slow_build(*a, **k):
        meta = build(*a, **k)
        barrier.wait()
        return meta

    monkeypatch.setattr(prepare_mod, "_build", slow_build)
    results, errors = [], []

    def call():
        try:
            results.append(default_dataset(tmp_path, progress=False))
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 2 and results[0] == results[1]
    assert load_meta(results[0])["num_files"] == len(MODULES)
    leftovers = [p.name for p in results[0].parent.iterdir()]
    assert leftovers == [results[0].name]
    shutil.rmtree(tmp_path / "datasets")
