"""User-facing errors.

Anything a user can get wrong (config, data, checkpoint, CLI) raises a subclass of
`SpjaxError` with a one-line message that names the field or file and the fix. The CLI
prints that line and exits with status 2; it never shows a traceback for these.
"""

import errno
from pathlib import Path


class SpjaxError(Exception):
    """Base class for errors caused by user input."""


class ConfigError(SpjaxError):
    """A config key is unknown, ill-typed or out of range."""


class DataError(SpjaxError):
    """An input file or prepared dataset is missing, empty, binary or unreadable."""


class CheckpointError(SpjaxError):
    """A checkpoint is corrupt or does not match the run it is restored into."""


class SweepError(SpjaxError):
    """A sweep spec is malformed, or a run directory belongs to a different point."""


class FitError(SpjaxError):
    """A runs table cannot be fitted: missing columns, bad values or too few points."""


class OutputError(SpjaxError):
    """A run's outputs (metrics, TensorBoard events, summary) cannot be written, e.g. a full
    disk."""


# ENOSPC and EDQUOT as the libraries spell them: OSError's strerror, and tensorstore's
# (under orbax) "... No space left on device [os_error_code='28']".
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded",
                   f"os_error_code='{errno.ENOSPC}'", f"os_error_code='{errno.EDQUOT}'")


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether `exc`, or an exception it was raised from or wraps, is a full disk or an
    exhausted quota (ENOSPC, EDQUOT): an OSError, or a library's error saying so."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(exc) for text in _DISK_FULL_TEXT):
            return True
        if isinstance(exc, BaseExceptionGroup) and any(is_disk_full(e) for e in exc.exceptions):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def write_failure(path: str | Path, exc: BaseException) -> str:
    """'cannot write PATH: why; fix' for an error writing a run's files (no trailing fix about
    resuming: the caller adds what happens next)."""
    if is_disk_full(exc):
        return (f"cannot write {path}: no space left on its file system (or the quota is "
                f"exhausted); free space there")
    why = getattr(exc, "strerror", None) or " ".join(str(exc).split())[:160] or type(exc).__name__
    return f"cannot write {path}: {why}; check that the directory is writable"


def not_a_directory(path: str | Path) -> str | None:
    """Why `path` cannot be (or be created as) a directory: it, or the nearest of its parents
    that exists, is a file. None when it can."""
    path = Path(path).expanduser().absolute()
    for parent in (path, *path.parents):
        if parent.exists():
            if parent.is_dir():
                return None
            return f"{parent} is a file"
    return None


def require_gpu(what: str, fix: str) -> None:
    """A ConfigError unless JAX runs on a GPU: `what` names the setting and what it runs
    ("sparsity.kernel runs GPU kernels (pallas)"), `fix` the setting to use instead."""
    import jax  # here, not at the top: this module is imported by light tools too

    backend = jax.default_backend()
    if backend != "gpu":
        raise ConfigError(f"{what}, and this machine's JAX backend is {backend}; use {fix}")
