"""Mask selections, distributions and schedules: exactness on fresh random inputs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spjax.sparsity import schedules
from spjax.sparsity.masks import (block_scores, counts_for, erk_densities, expand_blocks,
                                  is_nm_valid, nm_mask, rank_mask)


@pytest.mark.parametrize("k", [0, 1, 17, 500, 1024])
def test_rank_mask_keeps_exactly_the_k_largest(k):
    scores = jax.random.normal(jax.random.key(k), (32, 32))
    mask = rank_mask(scores, k)
    assert int(mask.sum()) == k
    if 0 < k < scores.size:
        assert float(scores[mask].min()) > float(scores[~mask].max())


def test_rank_mask_is_exact_with_ties_and_a_traced_k():
    scores = jnp.zeros((10, 10)).at[0, :3].set(1.0)  # 97 ties at zero
    counts = jax.jit(lambda k: rank_mask(scores, k).sum())(jnp.int32(40))
    assert int(counts) == 40
    assert bool(rank_mask(scores, 40)[0, :3].all())


@pytest.mark.parametrize("n, m", [(1, 4), (2, 4), (3, 8), (1, 8), (7, 8), (4, 32)])
def test_nm_mask_keeps_the_n_largest_of_every_m_along_inputs(n, m):
    scores = jax.random.normal(jax.random.key(n * m), (64, 24))
    mask = nm_mask(scores, n, m)
    assert bool(is_nm_valid(mask, n, m))
    groups = np.asarray(scores).reshape(64 // m, m, 24)
    kept = np.asarray(mask).reshape(64 // m, m, 24)
    for g in range(64 // m):
        for o in range(24):
            top = np.sort(groups[g, :, o])[::-1][:n]
            np.testing.assert_array_equal(np.sort(groups[g, kept[g, :, o], o])[::-1], top)


def test_block_scores_and_expansion():
    x = jax.random.normal(jax.random.key(0), (64, 96))
    scores = block_scores(x, 32)
    assert scores.shape == (2, 3)
    assert float(scores[1, 2]) == pytest.approx(float(jnp.abs(x[32:, 64:]).sum()), rel=1e-5)
    unit = jnp.array([[True, False, True], [False, True, False]])
    full = expand_blocks(unit, 32)
    assert full.shape == (64, 96) and int(full.sum()) == 3 * 32 * 32
    assert bool(full[40, 40]) and not bool(full[0, 40])


def _erk_reference(shapes, density):
    """The ERK formula written out plainly (rigl sparse_utils), with the capping loop."""
    dense = set()
    while True:
        divisor, rhs = 0.0, 0.0
        raw = {}
        for name, shape in shapes.items():
            n = math.prod(shape)
            if name in dense:
                rhs -= (1 - density) * n  # a dense layer uses its zeros' share of the budget
            else:
                rhs += density * n
                raw[name] = sum(shape) / n
                divisor += raw[name] * n
        eps = rhs / divisor
        worst = max(raw, key=raw.get)
        if eps * raw[worst] > 1:
            dense.add(worst)
            continue
        return {name: 1.0 if name in dense else eps * raw[name] for name in shapes}


def test_erk_densities_equal_the_formula_and_meet_the_target():
    shapes = {"q": (512, 512), "up": (512, 1376), "down": (1376, 512), "head": (512, 32000)}
    for density in (0.1, 0.3, 0.5):
        ours = erk_densities(shapes, density)
        ref = _erk_reference(shapes, density)
        for name in shapes:
            assert ours[name] == pytest.approx(ref[name], rel=1e-12)
        total = sum(math.prod(s) for s in shapes.values())
        kept = sum(ours[n] * math.prod(s) for n, s in shapes.items())
        assert kept == pytest.approx(density * total, rel=1e-9)
        assert ours["q"] > ours["up"] > ours["head"]  # smaller layers are denser


def test_erk_caps_layers_above_density_one_and_renormalizes():
    shapes = {"tiny": (4, 4), "mid": (64, 64), "big": (512, 512)}
    ours = erk_densities(shapes, 0.3)
    assert ours["tiny"] == 1.0  # raw density would exceed 1: made dense
    assert all(d <= 1.0 for d in ours.values())
    assert ours == pytest.approx(_erk_reference(shapes, 0.3), rel=1e-12)
    total = sum(math.prod(s) for s in shapes.values())
    kept = sum(ours[n] * math.prod(s) for n, s in shapes.items())
    assert kept == pytest.approx(0.3 * total, rel=1e-9)


def test_counts_hit_the_global_target_within_one_per_layer():
    rng = np.random.default_rng(0)
    shapes = {f"l{i}": (int(rng.integers(8, 300)), int(rng.integers(8, 300))) for i in range(40)}
    densities = erk_densities(shapes, 0.2)
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    counts = counts_for(densities, sizes)
    target = 0.2 * sum(sizes.values())
    assert abs(sum(counts.values()) - target) <= len(shapes)
    for name in shapes:
        assert abs(counts[name] - densities[name] * sizes[name]) <= 0.5


def test_schedules():
    t = jnp.arange(0, 101)
    s = schedules.cubic_sparsity(t, 0.8, 25, 75)
    assert float(s[25]) == 0.0 and float(s[75]) == pytest.approx(0.8) and float(s[100]) == \
        pytest.approx(0.8)
    assert np.all(np.diff(np.asarray(s)) >= 0)
    assert float(s[50]) == pytest.approx(0.8 * (1 - 0.5 ** 3))
    f = schedules.cosine_drop_fraction(t, 0.3, 75)
    assert float(f[0]) == pytest.approx(0.3) and float(f[75]) == 0.0
    assert float(f[37]) == pytest.approx(0.15 * (1 + math.cos(math.pi * 37 / 75)))
    period = schedules.Periodic(10, 50, 20)
    assert [int(x) for x in t[np.asarray(period.due(t))]] == [10, 30, 50]
    assert float(schedules.mask_decay(jnp.int32(100), "linear", 2e-3)) == pytest.approx(0.8)
    assert float(schedules.mask_decay(jnp.int32(100), "exponential", 2e-3)) == pytest.approx(
        math.exp(-0.2))
    assert schedules.structure_decay_patterns(1, 8, "stepwise") == [(7, 8), (4, 8), (2, 8), (1, 8)]
    assert schedules.structure_decay_patterns(1, 8, "geometric") == [(8, 64), (4, 32), (2, 16),
                                                                    (1, 8)]
    assert schedules.structure_decay_patterns(2, 4, "stepwise") == [(3, 4), (2, 4)]


@pytest.mark.parametrize("m", [4, 8, 16, 32, 64])
def test_nm_mask_matches_a_stable_sort_even_with_ties(m):
    """Both rank strategies (pairwise for small m, sort for large) equal a stable sort."""
    key = jax.random.key(m)
    scores = jnp.round(jax.random.normal(key, (4 * m, 12)) * 2) / 2  # many exact ties
    n = m // 4
    groups = np.asarray(scores).reshape(4, m, 12)
    expected = np.zeros_like(groups, bool)
    for g in range(4):
        for o in range(12):
            order = np.argsort(-groups[g, :, o], kind="stable")
            expected[g, order[:n], o] = True
    np.testing.assert_array_equal(np.asarray(nm_mask(scores, n, m)), expected.reshape(4 * m, 12))
