"""GaLore (spjax.lowrank.galore): state layout, refresh schedule, the paper's update, Adam
where it must equal Adam, sharding, errors. Fresh random inputs throughout."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from spjax.errors import ConfigError
from spjax.lowrank.galore import scale_by_galore


def _grads(key, params, scale=1.0):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([scale * jax.random.normal(k, p.shape, p.dtype)
                              for k, p in zip(keys, leaves)])


def _not_named(name):
    return lambda path, p: jax.tree_util.keystr(path) != f"['{name}']"


def _run(tx, grads_seq, params):
    state = tx.init(params)
    outs, states = [], []
    for g in grads_seq:
        u, state = tx.update(g, state)
        outs.append(u)
        states.append(state)
    return outs, states


def test_projected_state_shapes_and_orthonormal_projectors():
    r = 4
    params = {"wide": jnp.zeros((8, 16)), "tall": jnp.zeros((24, 12)), "skip": jnp.zeros((8, 16)),
              "norm": jnp.zeros((16,))}
    tx = scale_by_galore(r, is_target=_not_named("skip"))
    state = tx.init(params)
    _, state = tx.update(_grads(jax.random.key(0), params), state)
    treedef = jax.tree.structure(params)
    for part in (state.mu, state.nu, state.projector):
        assert jax.tree.structure(part) == treedef
    for part in (state.mu, state.nu):
        assert part["wide"].shape == (r, 16)  # m < n: left projector, moments r x n
        assert part["tall"].shape == (24, r)  # m > n: right projector, moments m x r
        assert part["skip"].shape == (8, 16) and part["norm"].shape == (16,)
    assert state.projector["wide"].shape == (8, r)
    assert state.projector["tall"].shape == (r, 12)
    assert state.projector["skip"].shape == () and state.projector["norm"].shape == ()
    p_left, q_right = np.asarray(state.projector["wide"]), np.asarray(state.projector["tall"])
    np.testing.assert_allclose(p_left.T @ p_left, np.eye(r), atol=1e-5)  # rank r, P^T P = I
    np.testing.assert_allclose(q_right @ q_right.T, np.eye(r), atol=1e-5)  # Q Q^T = I


def test_projector_refreshed_exactly_every_T_steps_from_the_current_gradient():
    T, r = 3, 2
    params = {"wide": jnp.zeros((6, 10)), "tall": jnp.zeros((10, 6))}
    grads = [_grads(jax.random.key(t), params) for t in range(8)]
    _, states = _run(scale_by_galore(r, update_every=T), grads, params)
    for name in params:
        for t in range(1, len(grads)):
            same = np.array_equal(states[t].projector[name], states[t - 1].projector[name])
            assert same == (t % T != 0), (name, t)
        for t in range(0, len(grads), T):  # spans the top-r singular subspace of G_t
            g = np.asarray(grads[t][name], np.float64)
            u, _, vh = np.linalg.svd(g, full_matrices=False)
            basis = vh[:r].T if g.shape[0] > g.shape[1] else u[:, :r]
            proj = np.asarray(states[t].projector[name], np.float64)
            proj = proj.T if g.shape[0] > g.shape[1] else proj
            np.testing.assert_allclose(proj @ proj.T, basis @ basis.T, atol=1e-5)


def _signed_permutation_start(key, shape):
    """A random gradient whose singular vectors on the projected side are the unit vectors:
    orthogonal rows (m <= n) or columns (m > n) with distinct norms."""
    m, n = shape
    k1, k2 = jax.random.split(key)
    q, _ = jnp.linalg.qr(jax.random.normal(k1, (max(m, n), min(m, n))))
    d = jnp.sort(jax.random.uniform(k2, (min(m, n),), minval=1.0, maxval=3.0))[::-1]
    return q * d if m > n else (q * d).T


@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])
def test_full_rank_equals_adam_only_in_a_signed_permutation_basis(shape):
    # With rank = min(m, n) the projector is square orthogonal and nothing is truncated, yet
    # GaLore is Adam *in the rotated basis*: P Adam(P^T G). Adam's first moment is linear, so
    # P M equals Adam's M for any fixed P; its elementwise V and division are not rotation
    # invariant, so the update equals Adam's only when P is a signed permutation (Adam
    # commutes with those). Hence: refresh once (T > steps) on a gradient whose singular
    # vectors are unit vectors, then feed arbitrary random gradients.
    steps, r = 5, min(shape)
    keys = jax.random.split(jax.random.key(1), steps)
    galore = scale_by_galore(r, update_every=100, scale=1.0)
    adam = optax.scale_by_adam()

    def compare(first):
        grads = [{"w": first}] + [_grads(k, {"w": first}) for k in keys[1:]]
        g_out, g_states = _run(galore, grads, {"w": first})
        a_out, a_states = _run(adam, grads, {"w": first})
        proj = np.asarray(g_states[-1].projector["w"])
        mu = np.asarray(g_states[-1].mu["w"])
        back_mu = mu @ proj if shape[0] > shape[1] else proj @ mu
        np.testing.assert_allclose(back_mu, a_states[-1].mu["w"], rtol=1e-4, atol=1e-6)
        return [np.max(np.abs(np.asarray(g["w"]) - np.asarray(a["w"])))
                for g, a in zip(g_out, a_out)]

    assert max(compare(_signed_permutation_start(keys[0], shape))) < 1e-4
    # a generic random gradient gives a generic rotation: the update is not Adam's
    assert max(compare(jax.random.normal(keys[0], shape))) > 0.1


def _paper_reference(grads, rank, T, scale, b1=0.9, b2=0.999, eps=1e-8, signs_like=None,
                     reset_on_refresh=False):
    """galore_torch's GaLoreProjector ('std') + AdamW step, in float64 numpy, lr 1, no decay.
    SVD signs are arbitrary (LAPACK's choice), and because moments are carried across a
    refresh the update depends on them: align each singular vector with `signs_like[t]`,
    the transform's projector after step t."""
    exp_avg = exp_avg_sq = ortho = None
    outs = []
    for step, g in enumerate(grads):
        g = np.asarray(g, np.float64)
        right = g.shape[0] > g.shape[1]
        if ortho is None or step % T == 0:
            u, _, vh = np.linalg.svd(g, full_matrices=False)
            ortho = vh[:rank, :] if right else u[:, :rank]
            ref = np.asarray(signs_like[step], np.float64)
            dots = np.sum(ortho * ref, axis=1 if right else 0, keepdims=True)
            assert np.allclose(np.abs(dots), 1.0, atol=1e-4)  # same subspace, up to signs
            ortho = ortho * np.sign(dots)
            if reset_on_refresh:
                exp_avg = exp_avg_sq = None
        low = g @ ortho.T if right else ortho.T @ g
        if exp_avg is None:
            exp_avg, exp_avg_sq = np.zeros_like(low), np.zeros_like(low)
        exp_avg = b1 * exp_avg + (1 - b1) * low
        exp_avg_sq = b2 * exp_avg_sq + (1 - b2) * low * low
        t = step + 1
        step_size = np.sqrt(1 - b2**t) / (1 - b1**t)
        norm_grad = exp_avg / (np.sqrt(exp_avg_sq) + eps)
        back = norm_grad @ ortho if right else ortho @ norm_grad
        outs.append(step_size * back * scale)
    return outs


@pytest.mark.parametrize("shape", [(7, 12), (12, 7)])
def test_matches_the_papers_update_for_three_steps_with_T_2(shape):
    # eps placement: the paper adds eps to sqrt(V) and folds bias correction into the step,
    # we add it to sqrt(V_hat); at eps 1e-8 the two differ by ~1e-8, far below float32.
    rank, T, scale = 3, 2, 0.25
    grads = [jax.random.normal(k, shape) for k in jax.random.split(jax.random.key(2), 3)]
    outs, states = _run(scale_by_galore(rank, update_every=T, scale=scale),
                        [{"w": g} for g in grads], {"w": grads[0]})
    signs = [s.projector["w"] for s in states]
    ref = _paper_reference(grads, rank, T, scale, signs_like=signs)
    for out, want in zip(outs, ref):
        np.testing.assert_allclose(out["w"], want, rtol=2e-4, atol=1e-6)
    # step 2 refreshes the projector and keeps the moments; a reset would change it
    reset = _paper_reference(grads, rank, T, scale, signs_like=signs, reset_on_refresh=True)
    assert not np.allclose(outs[2]["w"], reset[2], rtol=1e-2)


def test_non_target_leaves_are_plain_adam_exactly():
    params = {"emb": jnp.zeros((16, 8)), "norm": jnp.zeros((8,)), "w": jnp.zeros((8, 12))}
    grads = [_grads(k, params) for k in jax.random.split(jax.random.key(3), 4)]
    tx = scale_by_galore(4, update_every=2, b1=0.8, b2=0.99, eps=1e-6,
                         is_target=_not_named("emb"))
    outs, states = _run(tx, grads, params)
    a_outs, a_states = _run(optax.scale_by_adam(b1=0.8, b2=0.99, eps=1e-6), grads, params)
    for out, a_out in zip(outs, a_outs):
        for name in ("emb", "norm"):
            np.testing.assert_array_equal(out[name], a_out[name])
        assert not np.allclose(out["w"], a_out["w"])  # the target really was projected
    for name in ("emb", "norm"):
        np.testing.assert_array_equal(states[-1].mu[name], a_states[-1].mu[name])
        np.testing.assert_array_equal(states[-1].nu[name], a_states[-1].nu[name])


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py)")
def test_sharded_jit_matches_unsharded():
    # Both sides jitted: jit vs eager alone moves Adam's step-1 sign-like outputs by ~1e-4
    # relative where projected entries are near zero, which says nothing about sharding.
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = NamedSharding(mesh, P("fsdp", None))
    params = {"tall": jnp.zeros((64, 32)), "wide": jnp.zeros((32, 64)), "norm": jnp.zeros((32,))}
    grads = [_grads(k, params) for k in jax.random.split(jax.random.key(4), 3)]
    tx = scale_by_galore(8, update_every=2)

    def shard(tree):
        return {k: jax.device_put(v, rows if v.ndim == 2 else NamedSharding(mesh, P()))
                for k, v in tree.items()}

    update = jax.jit(tx.update)
    state, sharded_state = tx.init(params), jax.jit(tx.init)(shard(params))
    for g in grads:  # steps 0 and 2 refresh the projectors (SVD of a sharded matrix)
        want, state = update(g, state)
        g = shard(g)
        assert len(g["tall"].sharding.device_set) == 8
        out, sharded_state = update(g, sharded_state)
        for name in params:
            np.testing.assert_allclose(out[name], want[name], rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(sharded_state.projector[name], state.projector[name])
        # FSDP keeps its memory saving: moments (64 x r) stay split over the mesh like G
        assert sharded_state.mu["tall"].sharding.is_equivalent_to(rows, 2)
        assert out["tall"].sharding.is_equivalent_to(rows, 2)


def test_bad_rank_raises_config_error_naming_the_path():
    params = {"layers": {"attn": {"q": jnp.zeros((8, 16))}}, "norm": jnp.zeros((4,))}
    with pytest.raises(ConfigError, match=r"lowrank\.rank.*\['layers'\]\['attn'\]\['q'\].*"
                                          r"\(8, 16\)"):
        scale_by_galore(9).init(params)
    scale_by_galore(8).init(params)  # rank = min(m, n) is allowed
    with pytest.raises(ConfigError, match=r"lowrank\.rank"):
        scale_by_galore(0)
    with pytest.raises(ConfigError, match=r"lowrank\.galore\.update_every"):
        scale_by_galore(4, update_every=0)
