"""Input arguments -> documents.

An input is a text file, a JSONL file (one `{"text": ...}` object per line), a directory
(walked recursively) or a glob (`data/*.txt`, `data/**/*.md`). Anything the user named
*explicitly* must be usable: a missing, empty, binary or unreadable file is a `DataError`.
Files found by walking a directory or expanding a glob are filtered instead: binary,
non-UTF-8 and unreadable ones are skipped and counted, because real folders hold images,
lock files and caches next to the text.

A text file is one document; a JSONL line is one document. Files are read one at a time, so
a corpus never has to fit in memory.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import io
import itertools
import json
import os
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from spjax.errors import DataError

SNIFF_BYTES = 1 << 16
# Directories a walk never enters: VCS and tool state, caches, virtual environments.
SKIP_DIRS = frozenset({"__pycache__", "node_modules", "site-packages"})
FIX = "pass text files, JSONL with a 'text' field, directories or globs"


@dataclass(frozen=True)
class InputFile:
    path: Path
    explicit: bool  # named by the user (errors) vs. found by a walk or glob (skipped)

    @property
    def jsonl(self) -> bool:
        return self.path.name.endswith((".jsonl", ".jsonl.gz"))


@dataclass(frozen=True)
class Document:
    text: str
    source: str  # "path" or "path:line", for messages


@dataclass
class Skipped:
    """Files a directory walk or glob passed over, by reason, for one summary warning."""

    reasons: dict[str, list[str]] = field(default_factory=dict)

    def add(self, path: Path, reason: str) -> None:
        self.reasons.setdefault(reason, []).append(str(path))

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.reasons.values())

    def summary(self) -> str:
        parts = ", ".join(f"{len(v)} {r} (e.g. {v[0]})" for r, v in sorted(self.reasons.items()))
        return f"skipped {self.count} files: {parts}"


def _is_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def _walk(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place, sorted, so the walk order (and so the token stream) is reproducible.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS)
        out.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith("."))
    return out


def resolve_inputs(inputs: Sequence[str | Path]) -> list[InputFile]:
    """Expands inputs to files, in input order, each file once."""
    if not inputs:
        raise DataError(f"no inputs given; {FIX}")
    files: list[InputFile] = []
    seen: set[Path] = set()

    def add(p: Path, explicit: bool) -> None:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            files.append(InputFile(p, explicit))

    for raw in inputs:
        s = str(raw)
        if _is_glob(s) and not Path(s).exists():
            matches = sorted(glob.glob(os.path.expanduser(s), recursive=True))
            if not matches:
                raise DataError(f"{s}: glob matched no files; check the pattern (use ** for subdirectories)")
            for m in matches:
                mp = Path(m)
                if SKIP_DIRS.intersection(mp.parts):  # `**` descends into caches too
                    continue
                if mp.is_dir():
                    for f in _walk(mp):
                        add(f, explicit=False)
                elif mp.is_file():
                    add(mp, explicit=False)
            continue
        p = Path(s).expanduser()
        if not p.exists():
            raise DataError(f"{p}: no such file or directory; {FIX}")
        if p.is_dir():
            if not os.access(p, os.R_OK | os.X_OK):
                raise DataError(f"{p}: directory is not readable; fix its permissions (chmod +rx)")
            found = _walk(p)
            if not found:
                raise DataError(f"{p}: directory has no files; {FIX}")
            for f in found:
                add(f, explicit=False)
        else:
            add(p, explicit=True)
    return files


def _open(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _skip_or_raise(f: InputFile, skipped: Skipped, reason: str, fix: str) -> None:
    if f.explicit:
        raise DataError(f"{f.path}: {reason}; {fix}")
    skipped.add(f.path, reason)


def _sniff(f: InputFile, fh, skipped: Skipped) -> bytes | None:
    """The first block, or None (after recording or raising) when the file is not text."""
    # Sniff first: a multi-GB binary is rejected without reading it all.
    head = fh.read(SNIFF_BYTES)
    if b"\0" in head:
        return _skip_or_raise(f, skipped, "binary file (contains NUL bytes)", FIX)
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return _skip_or_raise(f, skipped, "not UTF-8 text", "convert it to UTF-8 or remove it from the inputs")
    return head


def _text_document(f: InputFile, skipped: Skipped) -> Document | None:
    with _open(f.path) as fh:
        head = _sniff(f, fh, skipped)
        if head is None:
            return None
        data = head + fh.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return _skip_or_raise(f, skipped, f"not UTF-8 text (bad byte at offset {e.start})", "convert it to UTF-8 or remove it from the inputs")
    if not text.strip():
        return _skip_or_raise(f, skipped, "empty", "remove it from the inputs")
    return Document(text, str(f.path))


def _jsonl_documents(f: InputFile, skipped: Skipped) -> Iterator[Document]:
    # Streamed line by line: JSONL files are often far larger than memory.
    fix = "each line must be a JSON object with a 'text' string"
    n = 0
    with _open(f.path) as fh:
        head = _sniff(f, fh, skipped)
        if head is None:
            return
        lines = itertools.chain(io.BytesIO(head + fh.readline()), fh)
        for lineno, raw in enumerate(lines, start=1):
            where = f"{f.path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{where}: not UTF-8 text; convert the file to UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg}); {fix}") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise DataError(f"{where}: no 'text' string field; {fix}")
            if obj["text"]:
                n += 1
                yield Document(obj["text"], where)
    if n == 0:
        _skip_or_raise(f, skipped, "empty", "remove it from the inputs (a JSONL file needs non-empty 'text' lines)")


def iter_documents(files: Sequence[InputFile], skipped: Skipped) -> Iterator[Document]:
    """Documents in file order; walked files that are not text are recorded in `skipped`."""
    for f in files:
        try:
            if f.jsonl:
                yield from _jsonl_documents(f, skipped)
            else:
                doc = _text_document(f, skipped)
                if doc is not None:
                    yield doc
        except PermissionError:
            _skip_or_raise(f, skipped, "permission denied", "fix its permissions (chmod +r) or remove it from the inputs")
        except (OSError, EOFError) as e:  # includes a corrupt .gz
            _skip_or_raise(f, skipped, f"cannot read ({type(e).__name__}: {e})", "check the file or remove it from the inputs")


def stdlib_inputs() -> list[Path]:
    """The running interpreter's standard-library `.py` sources: the built-in corpus.

    Real, varied text that is always installed, so `spjax train` works with no download.
    Empty files and the few deliberately non-UTF-8 test fixtures are left out, so every
    path returned is a valid explicit input.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in _walk(root):
        if p.suffix != ".py" or "dist-packages" in p.parts:
            continue
        try:
            data = p.read_bytes()
            if b"\0" in data or not data.decode("utf-8").strip():
                continue
        except (OSError, UnicodeDecodeError):
            continue
        out.append(p)
    return sorted(out, key=lambda q: q.relative_to(root).as_posix())
