"""`train.compile_cache`: JAX's persistent compilation cache for training runs.

A resumed or repeated run (same program, same shapes) loads its compiled step from the cache
instead of compiling again, which for models with Mosaic GPU kernels takes minutes. Entries
are keyed by the program, so runs and sweep points can share one directory.
"""

from __future__ import annotations

from pathlib import Path

import jax

from spjax.errors import ConfigError

MAX_BYTES = 4 * 2**30  # least recently used entries are evicted beyond this


def use_compile_cache(setting: str) -> str | None:
    """Points JAX's persistent compilation cache at train.compile_cache; returns the
    directory, or None when off. Entries are keyed by the program, so runs share it safely."""
    if setting == "auto":
        setting = "" if jax.default_backend() == "cpu" else str(
            Path.home() / ".cache" / "spjax" / "jax")
    if not setting:
        return None
    path = Path(setting).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"train.compile_cache: cannot create {path} ({e.strerror}); give a "
                          f"writable directory, or '' to turn the cache off") from None
    from jax.experimental.compilation_cache import compilation_cache

    jax.config.update("jax_compilation_cache_dir", str(path))
    if jax.config.jax_compilation_cache_max_size < 0 and _has_filelock():
        # JAX's default is unbounded; evict least recently used beyond 4 GiB (JAX needs
        # filelock for that, a dependency; without it the cache just stays unbounded)
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    compilation_cache.reset_cache()  # a cache opened earlier in this process moves here
    return str(path)


def _has_filelock() -> bool:
    try:
        import filelock  # noqa: F401
    except ImportError:
        return False
    return True
