"""Static attention patterns: exact tiles on small cases, causal and never-empty rows for
every pattern, density, the .npy path, and one-line errors for bad sizes."""

import numpy as np
import pytest

from spjax.errors import ConfigError
from spjax.config import attention_patterns as ap


def _rows(*rows):
    return np.array([[c == "x" for c in r] for r in rows], bool)


def test_sliding_window():
    np.testing.assert_array_equal(ap.build("sliding_window", seq_len=80, block=16, window=32),
                                  _rows("x....", "xx...", ".xx..", "..xx.", "...xx"))


def test_global_plus_local():
    np.testing.assert_array_equal(
        ap.build("global_local", seq_len=96, block=16, window=32, global_tokens=16),
        _rows("x.....", "xx....", "xxx...", "x.xx..", "x..xx.", "x...xx"))


def test_strided():
    np.testing.assert_array_equal(
        ap.build("strided", seq_len=96, block=16, window=16, stride=48),
        _rows("x.....", ".x....", "..x...", "x..x..", ".x..x.", "..x..x"))


def test_dilated():
    np.testing.assert_array_equal(
        ap.build("dilated", seq_len=96, block=16, window=48, dilation=2),
        _rows("x.....", ".x....", "x.x...", ".x.x..", "x.x.x.", ".x.x.x"))


@pytest.mark.parametrize("kind, sizes", [
    ("dense", {}), ("sliding_window", dict(window=64)),
    ("global_local", dict(window=64, global_tokens=32)),
    ("strided", dict(window=32, stride=64)), ("dilated", dict(window=64, dilation=3))])
def test_every_pattern_is_causal_with_the_diagonal(kind, sizes):
    mask = ap.build(kind, seq_len=512, block=16, **sizes)
    assert mask.shape == (32, 32) and mask.dtype == bool
    assert not np.triu(mask, 1).any()
    assert np.diagonal(mask).all()  # no empty query row
    density = ap.density(mask)
    assert (density == 1.0) == (kind == "dense")
    assert density == mask.sum() / (32 * 33 / 2)


def test_window_equal_to_the_sequence_is_dense():
    np.testing.assert_array_equal(ap.build("sliding_window", seq_len=64, block=16, window=64),
                                  ap.dense(4))


def test_mask_from_file(tmp_path):
    mask = np.random.default_rng(0).random((3, 4, 4)) < 0.5
    np.save(tmp_path / "m.npy", mask)
    loaded = ap.build("file", seq_len=64, block=16, path=str(tmp_path / "m.npy"), heads=3)
    np.testing.assert_array_equal(loaded, mask & ap.dense(4))  # the causal part, as given
    np.save(tmp_path / "two.npy", np.tril(np.ones((4, 4), np.int8)))
    np.testing.assert_array_equal(ap.build("file", seq_len=64, block=16,
                                           path=str(tmp_path / "two.npy")), ap.dense(4))


@pytest.mark.parametrize("kind, sizes, needle", [
    ("sliding_window", dict(window=128), "larger than the sequence"),
    ("sliding_window", dict(window=24), "multiple of the block"),
    ("sliding_window", dict(window=0), "at least 16 tokens"),
    ("global_local", dict(window=16, global_tokens=64), "fewer than the sequence"),
    ("strided", dict(window=16, stride=16), "stride must be at least 32"),
    ("dilated", dict(window=48, dilation=2), "more than the sequence"),
    ("dilated", dict(window=16, dilation=0), "dilation must be >= 1"),
    ("ring", {}, "must be one of"),
    ("file", {}, "needs a path"),
    ("file", dict(path="/nonexistent.npy"), "does not exist"),
])
def test_bad_sizes_are_one_line_errors(kind, sizes, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        ap.build(kind, seq_len=64, block=16, **sizes)
    assert "\n" not in str(e.value)


def test_bad_files(tmp_path):
    np.save(tmp_path / "wrong.npy", np.ones((3, 3), bool))
    with pytest.raises(ConfigError, match=r"shape \(3, 3\).*need \(4, 4\)"):
        ap.build("file", seq_len=64, block=16, path=str(tmp_path / "wrong.npy"))
    np.save(tmp_path / "values.npy", np.full((4, 4), 0.5))
    with pytest.raises(ConfigError, match="0/1 or bool"):
        ap.build("file", seq_len=64, block=16, path=str(tmp_path / "values.npy"))
    (tmp_path / "text.npy").write_text("not numpy")
    with pytest.raises(ConfigError, match="not a .npy array"):
        ap.build("file", seq_len=64, block=16, path=str(tmp_path / "text.npy"))
    with pytest.raises(ConfigError, match="multiple of the attention block"):
        ap.build("dense", seq_len=60, block=16)
