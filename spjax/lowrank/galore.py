"""GaLore (Zhao et al., ICML 2024, arXiv 2403.03507) as an optax transformation.

Weights stay dense and full-rank; the gradient G (m x n) of each target matrix is projected
onto a rank-r subspace and Adam runs there. With t = count (steps taken so far, from 0):

    every T steps (t % T == 0, t = 0 included), from the SVD of the current G in fp32:
        m > n:   Q = V_r^T (r x n)   R = G Q^T (m x r)      back(N) = N Q
        m <= n:  P = U_r   (m x r)   R = P^T G (r x n)      back(N) = P N
    M = b1 M + (1 - b1) R          V = b2 V + (1 - b2) R^2
    N = M_hat / (sqrt(V_hat) + eps),  M_hat = M / (1 - b1^(t+1)),  V_hat = V / (1 - b2^(t+1))
    update = scale * back(N)

This is `galore_torch` (GaLoreProjector proj_type "std" + its AdamW): the projector sits on
the smaller side, and M, V are *not* reset or rotated when the projector changes: moments
from the old basis carry into the new one, as in the paper's code. Non-target leaves get
plain Adam with the same b1, b2, eps (no `scale`). The output is Adam's direction only; chain
clipping before it and weight decay and the learning rate after it:

    optax.chain(optax.clip_by_global_norm(1.0), scale_by_galore(r),
                optax.add_decayed_weights(wd, mask), optax.scale_by_learning_rate(schedule))

Two deliberate differences from the paper's code, both small: eps is added to sqrt(V_hat)
(optax's Adam; the paper adds it to sqrt(V) and folds bias correction into the step size),
and the projector stays fp32 whatever the gradient dtype.

Memory per m x n target (m <= n, the paper's orientation): weight mn + projector mr + moments
2nr, against 3mn for Adam; e.g. 2048 x 5461 at r = 512: 17.8M vs 33.6M floats. For m > n the
roles swap (mn + nr + 2mr): the moments then span the *longer* side, as in the paper's code.

Why not `optax.contrib.galore` (optax 0.2.8): it projects the other side (m >= n gets the
left projector U_r, m < n the right one), so its subspace differs from the paper's; it also
clamps a too-large rank silently and nests Adam's state. Its sharded SVD is fine.

Note: JAX kernels are (in, out), torch weights (out, in); the rule above is symmetric under
transpose except for square matrices, where we project the output side (torch: the input).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from spjax.errors import ConfigError

IsTarget = Callable[[tuple, jax.Array], bool]


class GaLoreState(NamedTuple):
    """`mu`, `nu` and `projector` each have the params' tree structure, so code that finds
    per-parameter moments by tree structure (train.optimizer.zero_moments, memory accounting)
    sees them. Leaves: targets (m x n) have mu/nu (m, r) and projector (r, n) when m > n,
    mu/nu (r, n) and projector (m, r) when m < n; other leaves have full-shape mu/nu and a
    () placeholder projector. One `count` drives both the refresh and bias correction."""

    count: jax.Array  # int32 (), steps taken
    mu: Any
    nu: Any
    projector: Any


def _every_matrix(path: tuple, param: jax.Array) -> bool:
    return True  # only ever asked about 2-D leaves


def _right(shape: tuple[int, ...]) -> bool:
    """The paper's side rule, in our layout. The paper's code sees torch weights (out, in) and
    takes a right projector when rows >= cols; our kernels are (in, out), the transpose, so
    the same subspace is a right projector here when rows > cols and a left one otherwise
    (the two rules differ only for square matrices: q, k, v, o)."""
    return shape[0] > shape[1]


def _svd_projector(g_MxN: jax.Array, rank: int) -> jax.Array:
    u_MxK, _, vh_KxN = jnp.linalg.svd(g_MxN, full_matrices=False)
    return vh_KxN[:rank] if _right(g_MxN.shape) else u_MxK[:, :rank]


def _project(g_MxN: jax.Array, projector: jax.Array) -> jax.Array:
    return g_MxN @ projector.T if _right(g_MxN.shape) else projector.T @ g_MxN


def _project_back(n: jax.Array, projector: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return n @ projector if _right(shape) else projector @ n


def scale_by_galore(rank: int, update_every: int = 200, scale: float = 0.25,
                    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                    is_target: IsTarget | None = None) -> optax.GradientTransformation:
    """GaLore's Adam direction (see the module docstring). `is_target(path, param)` is asked
    about 2-D leaves only (path as from `jax.tree_util.tree_flatten_with_path`); default:
    every 2-D leaf. Raises ConfigError at init for a target with min(m, n) < rank."""
    if rank < 1:
        raise ConfigError(f"lowrank.rank must be >= 1 for GaLore, got {rank}")
    if update_every < 1:
        raise ConfigError(f"lowrank.galore.update_every must be >= 1, got {update_every}")
    is_target = is_target or _every_matrix
    adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)  # the one Adam for every leaf

    def init_fn(params: Any) -> GaLoreState:
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        mu, nu, projector = [], [], []
        for path, p in flat:
            if p.ndim == 2 and is_target(path, p):
                m, n = p.shape
                if rank > min(m, n):
                    raise ConfigError(
                        f"lowrank.rank={rank} exceeds min(m, n)={min(m, n)} of GaLore target "
                        f"{jax.tree_util.keystr(path)} with shape {tuple(p.shape)}; lower "
                        f"lowrank.rank or exclude it from GaLore's targets")
                moment_shape = (m, rank) if _right(p.shape) else (rank, n)
                mu.append(jnp.zeros(moment_shape, jnp.float32))
                nu.append(jnp.zeros(moment_shape, jnp.float32))
                projector.append(jnp.zeros((rank, n) if _right(p.shape) else (m, rank),
                                           jnp.float32))
            else:  # as optax.scale_by_adam: moments in the param's dtype
                mu.append(jnp.zeros_like(p))
                nu.append(jnp.zeros_like(p))
                projector.append(jnp.zeros((), jnp.float32))
        return GaLoreState(count=jnp.zeros([], jnp.int32), mu=treedef.unflatten(mu),
                           nu=treedef.unflatten(nu), projector=treedef.unflatten(projector))

    def update_fn(updates: Any, state: GaLoreState, params: Any = None
                  ) -> tuple[Any, GaLoreState]:
        del params
        grads, treedef = jax.tree.flatten(updates)
        # The state, not is_target, says which leaves are targets: it was decided at init.
        old_projectors = treedef.flatten_up_to(state.projector)
        refresh = state.count % update_every == 0

        projectors, projected = [], []
        for g, old in zip(grads, old_projectors):
            if old.ndim != 2:
                projectors.append(old)
                projected.append(g)
                continue
            g32 = g.astype(jnp.float32)
            # cond, not where: the SVD then runs only on refresh steps.
            new = jax.lax.cond(refresh, lambda g32: _svd_projector(g32, rank),
                               lambda g32, old=old: old, g32)
            projectors.append(new)
            projected.append(_project(g32, new))

        adam_state = optax.ScaleByAdamState(count=state.count, mu=state.mu, nu=state.nu)
        directions, adam_state = adam.update(treedef.unflatten(projected), adam_state)

        out = []
        for g, p, d in zip(grads, projectors, treedef.flatten_up_to(directions)):
            out.append(d if p.ndim != 2 else
                       (scale * _project_back(d, p, g.shape)).astype(g.dtype))
        return treedef.unflatten(out), GaLoreState(
            count=adam_state.count, mu=adam_state.mu, nu=adam_state.nu,
            projector=treedef.unflatten(projectors))

    return optax.GradientTransformation(init_fn, update_fn)
