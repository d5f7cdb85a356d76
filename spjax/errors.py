"""User-facing errors.

Anything a user can get wrong (config, data, checkpoint, CLI) raises a subclass of
`SpjaxError` with a one-line message that names the field or file and the fix. The CLI
prints that line and exits with status 2; it never shows a traceback for these.
"""

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
