"""Text -> token shards: `prepare_dataset`, the cached built-in `default_dataset`, `load_meta`.

Layout of a prepared dataset directory:

    meta.json            what load_meta validates and the pipeline reads (see `_meta`)
    tokenizer.json       only for HF/BPE tokenizers, exactly as used (EOS included)
    train/00000.bin ...  flat little-endian uint16 (vocab <= 65535) or uint32 token ids
    val/00000.bin

Each document's tokens are followed by EOS and documents are concatenated per split, so a
split is one token stream cut into shards of at most `SHARD_TOKENS`.

Train/val assignment is per document, by a seeded hash of its *content*: exact duplicates
land in the same split (no val leakage from copies), and the assignment of a document does
not depend on which other files are in the corpus. A first pass over the inputs makes the
plan (and surfaces bad inputs before any tokenizing); a second pass tokenizes and writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from spjax.data.sources import Document, InputFile, Skipped, iter_documents, resolve_inputs, stdlib_inputs
from spjax.data.tokenizer import (ByteTokenizer, HFTokenizer, Tokenizer, tokenizer_from_meta,
                                  train_bpe)
from spjax.errors import DataError, not_a_directory

FORMAT_VERSION = 1
SHARD_TOKENS = 1 << 26  # 64M tokens: 128 MiB per uint16 shard, big enough to keep file counts low
SPLITS = ("train", "val")
ENCODE_BATCH = 512  # documents per tokenizer call: HF tokenizers parallelize inside a batch, and
# a few very long files stall a small batch (64 left 16 cores mostly idle on 566 MB of source)
PREPARE_HINT = "run `spjax prepare-data INPUT... --out {path}{overwrite}`"


def _val_score(text: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by (content, seed): below val_fraction means val."""
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=seed.to_bytes(8, "little", signed=True))
    return int.from_bytes(h.digest(), "little") / 2.0**64


@dataclass(frozen=True)
class _Plan:
    """Result of the first pass: which documents go to val."""

    documents: int
    val_fraction: float
    seed: int
    forced_val: int | None  # index of a document moved to val so val is never empty (>= 2 docs)
    forced_train: int | None  # likewise for train (with val_fraction 0.5, all docs may hash to val)
    cut_single: bool  # exactly one document: its tail (at a line break) becomes val


def _no_bar(progress: bool) -> bool | None:
    """tqdm's `disable`: progress bars on a terminal only (None: off when stderr is not a
    TTY), so a log or a captured stderr holds the messages and not bar frames."""
    return None if progress else True


def _plan(files: Sequence[InputFile], val_fraction: float, seed: int, progress: bool) -> _Plan:
    n = n_val = 0
    lowest = highest = (0.0, -1)
    skipped = Skipped()
    for doc in tqdm(iter_documents(files, skipped), desc="scan", unit="doc", file=sys.stderr, disable=_no_bar(progress)):
        score = _val_score(doc.text, seed)
        n_val += score < val_fraction
        if n == 0 or score < lowest[0]:
            lowest = (score, n)
        if n == 0 or score >= highest[0]:
            highest = (score, n)
        n += 1
    if skipped.count:
        warnings.warn(skipped.summary(), stacklevel=3)
    if n == 0:
        raise DataError(f"{', '.join(str(f.path) for f in files[:3])}{'...' if len(files) > 3 else ''}: no text documents found; pass text files, JSONL with a 'text' field, directories or globs")
    many = val_fraction > 0 and n >= 2
    return _Plan(
        n, val_fraction, seed,
        forced_val=lowest[1] if many and n_val == 0 else None,
        forced_train=highest[1] if many and n_val == n else None,
        cut_single=val_fraction > 0 and n == 1,
    )


def _cut(text: str, val_fraction: float) -> tuple[str, str]:
    """Splits one document after the last line break before the (1 - val_fraction) point
    (or exactly at that point when there is no line break in the second half of the head)."""
    target = min(max(round(len(text) * (1 - val_fraction)), 1), len(text) - 1)
    cut = text.rfind("\n", 0, target) + 1
    if cut <= target // 2:
        cut = target
    return text[:cut], text[cut:]


def _split_documents(files: Sequence[InputFile], plan: _Plan) -> Iterator[tuple[str, Document]]:
    for i, doc in enumerate(iter_documents(files, Skipped())):
        if plan.cut_single and len(doc.text) >= 2:
            head, tail = _cut(doc.text, plan.val_fraction)
            yield "train", Document(head, doc.source)
            yield "val", Document(tail, doc.source)
        elif i == plan.forced_train:
            yield "train", doc
        elif i == plan.forced_val or _val_score(doc.text, plan.seed) < plan.val_fraction:
            yield "val", doc
        else:
            yield "train", doc


class _ShardWriter:
    """Appends token arrays to `<split>/NNNNN.bin`, starting a new shard every `shard_tokens`."""

    def __init__(self, root: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.root, self.split, self.dtype, self.shard_tokens = root, split, dtype, shard_tokens
        self.shards: list[str] = []
        self.shard_sizes: list[int] = []
        self.documents = 0
        self._fh = None
        (root / split).mkdir()

    def write(self, ids: np.ndarray) -> None:
        ids = ids.astype(self.dtype, copy=False)
        while ids.size:
            if self._fh is None or self.shard_sizes[-1] == self.shard_tokens:
                self._next_shard()
            room = self.shard_tokens - self.shard_sizes[-1]
            ids[:room].tofile(self._fh)
            self.shard_sizes[-1] += min(room, ids.size)
            ids = ids[room:]

    def _next_shard(self) -> None:
        if self._fh is not None:
            self._fh.close()
        name = f"{self.split}/{len(self.shards):05d}.bin"
        self._fh = open(self.root / name, "wb")
        self.shards.append(name)
        self.shard_sizes.append(0)

    def close(self) -> dict[str, Any]:
        if self._fh is not None:
            self._fh.close()
        return {
            "tokens": int(sum(self.shard_sizes)),
            "documents": self.documents,
            "shards": self.shards,
            "shard_tokens": self.shard_sizes,
        }


def unigram_entropy(counts: np.ndarray) -> float:
    """Entropy (nats) of the token frequency distribution: the loss of a model that ignores context."""
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _tokenizer_arg(tokenizer: str, bpe_vocab_size: int) -> Tokenizer | None:
    """The tokenizer named by the argument, or None for "bpe" (trained after the plan)."""
    if tokenizer == "byte":
        return ByteTokenizer()
    if tokenizer == "bpe":
        if not 257 <= bpe_vocab_size <= 2**32 - 1:
            raise DataError(f"bpe vocab size (--vocab-size) {bpe_vocab_size} is out of range; use a value in [257 (256 bytes + EOS), {2**32 - 1}]")
        return None
    if tokenizer.endswith(".json") or Path(tokenizer).exists():
        return HFTokenizer.from_file(tokenizer)
    raise DataError(f"tokenizer {tokenizer!r} is unknown; use 'byte', 'bpe' or a path to a HF tokenizer.json")


def _batched(it: Iterator[tuple[str, Document]], n: int) -> Iterator[list[tuple[str, Document]]]:
    batch = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _build(tmp: Path, files: Sequence[InputFile], inputs_desc: list[str], tokenizer: str, val_fraction: float,
           bpe_vocab_size: int, seed: int, progress: bool, shard_tokens: int) -> dict[str, Any]:
    tok = _tokenizer_arg(tokenizer, bpe_vocab_size)  # a bad tokenizer path fails before the scan
    plan = _plan(files, val_fraction, seed, progress)
    if tok is None:
        tok = train_bpe((d.text for s, d in _split_documents(files, plan) if s == "train"), bpe_vocab_size)
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 65535 else np.uint32)
    writers = {s: _ShardWriter(tmp, s, dtype, shard_tokens) for s in SPLITS}
    counts = np.zeros(tok.vocab_size, np.int64)
    eos = np.array([tok.eos_id], np.int32)
    docs = _split_documents(files, plan)
    bar = tqdm(total=plan.documents + plan.cut_single, desc=f"tokenize ({tok.name})", unit="doc", file=sys.stderr, disable=_no_bar(progress))
    for batch in _batched(docs, ENCODE_BATCH):
        train_ids = []
        for (split, _), ids in zip(batch, tok.encode_batch([d.text for _, d in batch])):
            ids = np.concatenate([ids, eos])
            writers[split].write(ids)
            writers[split].documents += 1
            if split == "train":
                train_ids.append(ids)
        if train_ids:  # one bincount per batch: a per-document one zero-fills vocab_size each time
            counts += np.bincount(np.concatenate(train_ids), minlength=tok.vocab_size)
        bar.update(len(batch))
    bar.close()
    splits = {s: w.close() for s, w in writers.items()}
    if isinstance(tok, HFTokenizer):
        tok.save(tmp / "tokenizer.json")
    meta = {
        "format_version": FORMAT_VERSION,
        "tokenizer": tok.describe(),
        "vocab_size": int(tok.vocab_size),
        "eos_id": int(tok.eos_id),
        "dtype": dtype.name,
        "splits": splits,
        "unigram_entropy_nats": unigram_entropy(counts) if counts.sum() else None,
        "inputs": inputs_desc,
        "num_files": len(files),
        "seed": seed,
        "val_fraction": val_fraction,
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


class _OutExists(Exception):
    """Another writer published `out` first (only raised without overwrite)."""


def _nonempty(p: Path) -> bool:
    return p.exists() and (not p.is_dir() or any(p.iterdir()))


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Atomically makes `tmp` appear as `out`: readers see the old dataset or the new, never half."""
    old = None
    if overwrite and _nonempty(out):
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
    try:
        os.rename(tmp, out)  # replaces only an empty directory; fails if one appeared meanwhile
    except OSError:
        if old is not None and not out.exists():
            os.replace(old / out.name, out)  # put the previous dataset back
        if _nonempty(out):
            raise _OutExists() from None
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _prepare(files: Sequence[InputFile], inputs_desc: list[str], out: str | Path, *, tokenizer: str,
             val_fraction: float, bpe_vocab_size: int, seed: int, progress: bool, overwrite: bool,
             shard_tokens: int) -> dict[str, Any]:
    if not 0.0 <= val_fraction <= 0.5:
        raise DataError(f"val_fraction={val_fraction} is out of range; use a value in [0, 0.5]")
    if not -2**63 <= seed < 2**63:  # it keys a 64-bit hash
        raise DataError(f"seed={seed} is out of range; use an integer that fits in 64 bits")
    out = Path(out).expanduser()
    if _nonempty(out) and not overwrite:
        raise DataError(f"{out}: already exists and is not empty; choose another --out or pass --overwrite")
    problem = not_a_directory(out.parent)
    if problem:
        raise DataError(f"{out}: cannot create it ({problem}); choose another --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # Built beside `out` (same filesystem, so the final rename is atomic) under a hidden
        # name: an interrupted prepare leaves only `.NAME.tmp-*`, never something that looks
        # complete.
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise DataError(f"{out}: cannot create it ({e.strerror}); choose another --out or fix "
                        f"the permissions of {out.parent}") from None
    try:
        meta = _build(tmp, files, inputs_desc, tokenizer, val_fraction, bpe_vocab_size, seed, progress, shard_tokens)
        _publish(tmp, out, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def prepare_dataset(
    inputs: Sequence[str | Path],
    out: str | Path,
    tokenizer: str = "byte",
    val_fraction: float = 0.01,
    bpe_vocab_size: int = 8192,
    seed: int = 0,
    progress: bool = True,
    overwrite: bool = False,
    shard_tokens: int = SHARD_TOKENS,
) -> dict[str, Any]:
    """Tokenizes `inputs` into a dataset directory `out` and returns its meta.json contents.

    tokenizer: "byte", "bpe" (byte-level BPE trained on the train documents, with
    `bpe_vocab_size` tokens) or a path to a HF `tokenizer.json`. progress: bars on stderr
    when it is a terminal.
    """
    files = resolve_inputs(inputs)
    try:
        return _prepare(files, [str(i) for i in inputs], out, tokenizer=tokenizer, val_fraction=val_fraction,
                        bpe_vocab_size=bpe_vocab_size, seed=seed, progress=progress, overwrite=overwrite,
                        shard_tokens=shard_tokens)
    except _OutExists:
        raise DataError(f"{out}: was created by another process while preparing; choose another --out or pass --overwrite") from None


def cache_root() -> Path:
    """`$SPJAX_CACHE`, else `~/.cache/spjax`."""
    return Path(os.environ.get("SPJAX_CACHE") or "~/.cache/spjax").expanduser()


def default_dataset(cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """The built-in corpus (this interpreter's stdlib source, byte tokenizer), prepared once.

    Lives at `<cache_dir or cache_root()>/datasets/stdlib-pyXY-byte`. Concurrent callers are
    safe: each builds in its own temp dir, the first rename wins, the others reuse it.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    out = root / "datasets" / f"stdlib-py{sys.version_info.major}{sys.version_info.minor}-byte"
    if (out / "meta.json").exists():
        try:
            load_meta(out)
            return out
        except DataError:
            pass  # a damaged cache is rebuilt below, atomically replacing it
    damaged = _nonempty(out)
    files = [InputFile(p, explicit=True) for p in stdlib_inputs()]
    desc = [f"stdlib:{sysconfig.get_paths()['stdlib']}"]
    try:
        _prepare(files, desc, out, tokenizer="byte", val_fraction=0.01, bpe_vocab_size=0, seed=0,
                 progress=progress, overwrite=damaged, shard_tokens=SHARD_TOKENS)
    except _OutExists:
        pass  # lost the race: the winner's dataset is complete (it was renamed into place whole)
    except DataError:
        if not (out / "meta.json").exists():  # `out` appeared between our check and our build
            raise
    load_meta(out)
    return out


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def load_meta(path: str | Path) -> dict[str, Any]:
    """Reads and validates `path/meta.json` and that every shard it lists is whole."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise DataError(f"{path}: a file, not a prepared dataset; give the folder that "
                        f"`spjax prepare-data --out` wrote")
    if not path.is_dir():
        raise DataError(f"{path}: no prepared dataset here; "
                        f"{PREPARE_HINT.format(path=path, overwrite='')}")
    # A damaged dataset is prepared again over itself
    hint = PREPARE_HINT.format(path=path, overwrite=" --overwrite" if _nonempty(path) else "")
    mp = path / "meta.json"
    if not mp.is_file():
        raise DataError(f"{mp}: missing, so {path} is not a prepared dataset; {hint}")
    try:
        meta = json.loads(mp.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{mp}: unreadable ({type(e).__name__}); {hint}") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{mp}: format version {meta.get('format_version') if isinstance(meta, dict) else None} is not {FORMAT_VERSION}; {hint}")
    try:
        itemsize = np.dtype(meta["dtype"]).itemsize
        shards = [(name, n) for s in SPLITS for name, n in zip(meta["splits"][s]["shards"], meta["splits"][s]["shard_tokens"], strict=True)]
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{mp}: malformed ({type(e).__name__}: {e}); {hint}") from None
    vocab, eos = meta.get("vocab_size"), meta.get("eos_id")
    if not (_count(vocab) and vocab > 0):
        raise DataError(f"{mp}: 'vocab_size' is {vocab!r}, not a positive integer; {hint}")
    if not (_count(eos) and eos < vocab):
        raise DataError(f"{mp}: 'eos_id' is {eos!r}, not a token id below vocab_size {vocab}; "
                        f"{hint}")
    for name, n in shards:
        shard = path / name
        if not shard.is_file():
            raise DataError(f"{shard}: shard is missing; {hint}")
        size = shard.stat().st_size
        if size != n * itemsize:
            raise DataError(f"{shard}: shard is truncated ({size} bytes, meta.json says {n * itemsize}); {hint}")
    return meta


def load_tokenizer(dataset_dir: str | Path) -> Tokenizer:
    """Rebuilds the tokenizer recorded in a prepared dataset's meta.json."""
    meta = load_meta(dataset_dir)
    return tokenizer_from_meta(meta["tokenizer"], Path(dataset_dir))
