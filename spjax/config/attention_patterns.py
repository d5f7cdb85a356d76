"""Static block-sparse attention patterns: causal block masks over (query block, key block)
tiles of `block` tokens, for the kernels of pallas_kernels/block_sparse_attention.

Each function returns a numpy bool (n, n) mask, n = seq_len / block, with only tiles on or
below the diagonal set (the diagonal always, so every query sees at least its own block and
no row is empty). Sizes are in tokens and must be multiples of the block:

  dense           every causal tile
  sliding_window  key block j for query block i if 0 <= i - j < window / block
  global_local    the first `global_tokens` (every query sees them) plus the local window
  strided         the local window plus every key block at a multiple of `stride` behind
                  (Sparse Transformer's strided pattern: i - j = 0 mod stride / block)
  dilated         `window / block` key blocks spaced `dilation` blocks apart, the diagonal
                  first (Longformer's dilated window)
  file            a block mask from a .npy file: (n, n), or (H, n, n) for one per head;
                  tiles above the diagonal are ignored, the rest is used as given (a query
                  block row with no kept tile gets a zero attention output)

Bad sizes are one-line `ConfigError`s naming the pattern and the fix.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from spjax.errors import ConfigError

KINDS = ("dense", "sliding_window", "global_local", "strided", "dilated", "file")


def _blocks(kind: str, what: str, tokens: int, block: int, seq_len: int, minimum: int = 1
            ) -> int:
    if tokens < minimum * block:
        raise ConfigError(f"attention pattern '{kind}': {what} must be at least "
                          f"{minimum * block} tokens ({minimum} block of {block}), got {tokens}")
    if tokens % block:
        raise ConfigError(f"attention pattern '{kind}': {what} ({tokens} tokens) must be a "
                          f"multiple of the block ({block})")
    if tokens > seq_len:
        raise ConfigError(f"attention pattern '{kind}': {what} ({tokens} tokens) is larger "
                          f"than the sequence ({seq_len} tokens); shorten it or use 'dense'")
    return tokens // block


def _offsets(n: int) -> np.ndarray:
    """(n, n) int: i - j, query block minus key block."""
    index = np.arange(n)
    return index[:, None] - index[None, :]


def dense(n: int) -> np.ndarray:
    return np.tril(np.ones((n, n), bool))


def sliding_window(n: int, window_blocks: int) -> np.ndarray:
    d = _offsets(n)
    return (d >= 0) & (d < window_blocks)


def global_local(n: int, global_blocks: int, window_blocks: int) -> np.ndarray:
    d = _offsets(n)
    return sliding_window(n, window_blocks) | ((d >= 0) & (np.arange(n)[None, :] < global_blocks))


def strided(n: int, stride_blocks: int, window_blocks: int) -> np.ndarray:
    d = _offsets(n)
    return sliding_window(n, window_blocks) | ((d >= 0) & (d % stride_blocks == 0))


def dilated(n: int, window_blocks: int, dilation: int) -> np.ndarray:
    d = _offsets(n)
    return (d >= 0) & (d % dilation == 0) & (d // dilation < window_blocks)


def from_file(path: str, n: int, heads: int | None = None) -> np.ndarray:
    """A (n, n) or (heads, n, n) block mask saved with np.save; nonzero = kept."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"attention pattern 'file': '{path}' does not exist")
    try:
        mask = np.load(file, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ConfigError(f"attention pattern 'file': '{path}' is not a .npy array "
                          f"({str(e).splitlines()[0]})") from None
    allowed = [(n, n)] + ([(heads, n, n)] if heads else [])
    if mask.shape not in allowed:
        raise ConfigError(f"attention pattern 'file': '{path}' holds a mask of shape "
                          f"{mask.shape}; this sequence length and block need "
                          f"{' or '.join(str(s) for s in allowed)}")
    if mask.dtype != bool and not np.isin(mask, (0, 1)).all():
        raise ConfigError(f"attention pattern 'file': '{path}' must hold 0/1 or bool values")
    return mask.astype(bool) & dense(n)


def build(kind: str, *, seq_len: int, block: int, window: int = 0, global_tokens: int = 0,
          stride: int = 0, dilation: int = 1, path: str = "", heads: int | None = None
          ) -> np.ndarray:
    """The block mask of pattern `kind` for sequences of `seq_len` tokens (sizes in tokens)."""
    if kind not in KINDS:
        raise ConfigError(f"attention pattern must be one of {', '.join(KINDS)}, got {kind!r}")
    if block <= 0 or seq_len % block:
        raise ConfigError(f"attention pattern '{kind}': the sequence length ({seq_len}) must be "
                          f"a multiple of the attention block ({block})")
    n = seq_len // block
    if kind == "dense":
        return dense(n)
    if kind == "file":
        if not path:
            raise ConfigError("attention pattern 'file' needs a path to a .npy block mask")
        return from_file(path, n, heads)
    if kind == "dilated":
        if dilation < 1:
            raise ConfigError(f"attention pattern 'dilated': dilation must be >= 1, got "
                              f"{dilation}")
        w = _blocks(kind, "window", window, block, seq_len)
        if (w - 1) * dilation + 1 > n:
            raise ConfigError(f"attention pattern 'dilated': window {window} tokens with "
                              f"dilation {dilation} spans {((w - 1) * dilation + 1) * block} "
                              f"tokens, more than the sequence ({seq_len}); shrink either")
        return dilated(n, w, dilation)
    w = _blocks(kind, "window", window, block, seq_len)
    if kind == "sliding_window":
        return sliding_window(n, w)
    if kind == "global_local":
        g = _blocks(kind, "global_tokens", global_tokens, block, seq_len)
        if g >= n:
            raise ConfigError(f"attention pattern 'global_local': global_tokens "
                              f"({global_tokens}) must be fewer than the sequence ({seq_len})")
        return global_local(n, g, w)
    s = _blocks(kind, "stride", stride, block, seq_len, minimum=2)
    return strided(n, s, w)


def pair_density(mask: np.ndarray, block: int) -> float:
    """Share of the causal (query, key) pairs a block mask lets attend, averaged over leading
    dimensions: a kept off-diagonal tile has b^2 pairs, a kept diagonal tile b (b + 1) / 2.
    Attention FLOPs scale with it (dense causal: 1.0)."""
    n = mask.shape[-1]
    causal = mask & dense(n)
    diagonal = np.diagonal(causal, axis1=-2, axis2=-1).sum()
    pairs = (causal.sum() - diagonal) * block * block + diagonal * block * (block + 1) / 2
    t = n * block
    return float(pairs / (t * (t + 1) / 2) / (causal.size // (n * n)))


def density(mask: np.ndarray) -> float:
    """Kept tiles over causal tiles (1.0 for dense), averaged over leading dimensions."""
    n = mask.shape[-1]
    return float(np.sum(mask & dense(n)) / (n * (n + 1) / 2 * (mask.size // (n * n))))
