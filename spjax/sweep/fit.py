"""Scaling-law fits: Chinchilla approach 3 on a runs table.

    L(N, D) = E + A / N^alpha + B / D^beta

fitted in log space as Hoffmann et al. (2022) and Besiroglu et al. (2024) do:

    log L_hat = LSE(a - alpha log N, b - beta log D, e),   A = e^a, B = e^b, E = e^e
    minimize  sum_i Huber_delta(log L_hat_i - log L_i),    delta = 1e-3

with L-BFGS (scipy's L-BFGS-B) from a grid of initializations; the best converged fit wins.
The grid is Chinchilla's: alpha, beta in {0, 0.5, 1, 1.5, 2}, e in {-1, -0.5, 0, 0.5, 1}, a, b
in {0, 5, ..., 25} (4500 points). By default L-BFGS starts from the 32 grid points with the
lowest objective, ranked by evaluating the objective on the whole grid (one vectorized pass).
On 30 synthetic points (tests/test_fit.py, two noise seeds) the full 4500-start run took 140-160
s on a busy 2-core CPU and found the same optimum to 9 digits as the 32 best starts (1-2 s):
starts far from the data's loss level end in the same poor minima. `starts=0` runs the whole
grid.
The `avg-params` law ('The Journey Matters') uses the average non-zero parameter count over
training as N; `chinchilla` the dense count.

Bounds (alpha, beta in [0, 5], a, b in [-50, 100], e in [-10, 10]) never bind in a well-posed
fit; they only stop a fit of a handful of points from running off to infinity. fit.json says
which parameters, if any, ended at a bound.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Sequence

import numpy as np

from spjax.errors import FitError

HUBER_DELTA = 1e-3
GRID_ALPHA = GRID_BETA = (0.0, 0.5, 1.0, 1.5, 2.0)
GRID_E = (-1.0, -0.5, 0.0, 0.5, 1.0)
GRID_AB = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)
# theta = (a, b, e, alpha, beta)
BOUNDS = ((-50.0, 100.0), (-50.0, 100.0), (-10.0, 10.0), (0.0, 5.0), (0.0, 5.0))
NAMES = ("a", "b", "e", "alpha", "beta")


@dataclasses.dataclass(frozen=True)
class Law:
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, n, d):
        n, d = np.asarray(n, float), np.asarray(d, float)
        return self.E + self.A / n ** self.alpha + self.B / d ** self.beta

    def compute_optimal(self, c_prime):
        """N, D minimizing L subject to N D = c_prime (C = k N D, c_prime = C / k):
        N_opt = G c'^(beta / (alpha + beta)), G = (alpha A / (beta B))^(1 / (alpha + beta))."""
        s = self.alpha + self.beta
        if self.alpha <= 0 or self.beta <= 0:
            raise FitError("the fitted alpha or beta is 0, so the law has no compute-optimal "
                           "frontier; add model sizes or token budgets to the sweep")
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / s)
        c_prime = np.asarray(c_prime, float)
        n = g * c_prime ** (self.beta / s)
        return n, c_prime / n

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class FitResult:
    law: Law
    theta: np.ndarray  # (a, b, e, alpha, beta)
    objective: float  # sum of Huber losses at the optimum
    converged: bool
    starts: int
    at_bound: tuple[str, ...]


def _objective(theta, log_n, log_d, log_l, delta):
    """Sum of Huber(log L_hat - log L) over points, scaled by 1 / delta^2, and its gradient.

    The scale leaves the minimizer alone but makes the objective O(1) per point: unscaled
    (~1e-6), L-BFGS-B's relative-decrease test (measured against max(|f|, 1)) would stop it
    at once."""
    a, b, e, alpha, beta = theta
    t = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    top = t.max(axis=0)
    w = np.exp(t - top)
    total = w.sum(axis=0)
    r = top + np.log(total) - log_l
    huber = np.where(np.abs(r) <= delta, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta))
    dr = np.clip(r, -delta, delta) / delta ** 2
    p = w / total  # d LSE / d t
    grad = np.array([(dr * p[0]).sum(), (dr * p[1]).sum(), (dr * p[2]).sum(),
                     -(dr * p[0] * log_n).sum(), -(dr * p[1] * log_d).sum()])
    return huber.sum() / delta ** 2, grad


def initial_grid() -> np.ndarray:
    """Chinchilla's grid of initializations, as (a, b, e, alpha, beta) rows (4500)."""
    return np.array([(a, b, e, al, be) for al, be, e, a, b in itertools.product(
        GRID_ALPHA, GRID_BETA, GRID_E, GRID_AB, GRID_AB)])


def ranked_grid(n, d, loss, count: int, delta: float = HUBER_DELTA) -> np.ndarray:
    """The `count` grid points with the lowest objective on this data (0: the whole grid)."""
    grid = initial_grid()
    if count <= 0 or count >= len(grid):
        return grid
    log_n, log_d, log_l = (np.log(np.asarray(x, float))[None, :] for x in (n, d, loss))
    a, b, e, alpha, beta = (grid[:, i:i + 1] for i in range(5))
    with np.errstate(over="ignore", invalid="ignore"):
        t1, t2 = a - alpha * log_n, b - beta * log_d  # (grid, points)
        t = np.stack([t1, t2, np.broadcast_to(e, t1.shape)])
        top = t.max(axis=0)
        r = top + np.log(np.exp(t - top).sum(axis=0)) - log_l
        huber = np.where(np.abs(r) <= delta, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta))
    values = np.where(np.isfinite(huber.sum(axis=1)), huber.sum(axis=1), np.inf)
    return grid[np.argsort(values, kind="stable")[:count]]


def fit_law(n: Sequence[float], d: Sequence[float], loss: Sequence[float],
            delta: float = HUBER_DELTA, starts: np.ndarray | int = 32) -> FitResult:
    """Fits L = E + A/N^alpha + B/D^beta. `starts`: explicit (a, b, e, alpha, beta) rows, or
    how many of the best grid points to start from (0: all 4500); the lowest converged
    objective wins."""
    from scipy.optimize import minimize
    from threadpoolctl import threadpool_limits

    log_n, log_d, log_l = (np.log(np.asarray(x, float)) for x in (n, d, loss))
    if isinstance(starts, (int, np.integer)):
        starts = ranked_grid(n, d, loss, int(starts), delta)
    starts = np.atleast_2d(starts)
    best, best_ok = None, None
    # One BLAS thread: L-BFGS-B's 5-variable BLAS calls are ~25x slower when OpenBLAS wakes
    # its thread pool for each of them on busy cores (measured: 4.1 s vs 0.27 s for 4 starts).
    with np.errstate(over="ignore", invalid="ignore"), threadpool_limits(1):
        for theta0 in starts:
            res = minimize(_objective, theta0, args=(log_n, log_d, log_l, delta), jac=True,
                           method="L-BFGS-B", bounds=BOUNDS,
                           options={"maxiter": 1000, "ftol": 1e-12, "gtol": 1e-9})
            if not np.isfinite(res.fun):
                continue
            if best is None or res.fun < best.fun:
                best = res
            if res.success and (best_ok is None or res.fun < best_ok.fun):
                best_ok = res
    chosen = best_ok if best_ok is not None else best
    if chosen is None:
        raise FitError("the fit diverged from every initialization; check the table's values")
    theta = np.asarray(chosen.x, float)
    a, b, e, alpha, beta = theta
    at_bound = tuple(name for name, x, (lo, hi) in zip(NAMES, theta, BOUNDS)
                     if math.isclose(x, lo, abs_tol=1e-6) or math.isclose(x, hi, abs_tol=1e-6))
    law = Law(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=float(alpha), beta=float(beta))
    return FitResult(law, theta, float(chosen.fun) * delta ** 2, best_ok is not None,
                     len(starts), at_bound)


def warm_starts(result: FitResult, n: Sequence[float], d: Sequence[float],
                loss: Sequence[float], count: int = 1, delta: float = HUBER_DELTA) -> np.ndarray:
    """The full fit's optimum plus the `count` best grid points on this data: the starts of
    refits on resampled or reduced data, which lie near the full fit (200 bootstrap refits
    from 32 starts each would take minutes)."""
    return np.vstack([result.theta, ranked_grid(n, d, loss, count, delta)])


def bootstrap(n, d, loss, result: FitResult, resamples: int = 200, seed: int = 0,
              level: float = 0.95, delta: float = HUBER_DELTA) -> dict:
    """Percentile confidence intervals from refits on points resampled with replacement.
    Resamples with a single model size or token budget cannot identify the law; they are
    redrawn."""
    n, d, loss = (np.asarray(x, float) for x in (n, d, loss))
    rng = np.random.default_rng(seed)
    starts = warm_starts(result, n, d, loss, delta=delta)
    fits = []
    for _ in range(resamples):
        for _ in range(100):
            idx = rng.integers(0, len(n), len(n))
            if len(np.unique(n[idx])) > 1 and len(np.unique(d[idx])) > 1:
                break
        else:
            break  # (almost) no resample can identify the law: report what we have
        fits.append(fit_law(n[idx], d[idx], loss[idx], delta, starts).law.as_dict())
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    out: dict = {"level": level, "resamples": len(fits), "seed": seed}
    for key in ("E", "A", "B", "alpha", "beta"):
        values = np.array([f[key] for f in fits])
        out[key] = ([float(np.percentile(values, lo)), float(np.percentile(values, hi))]
                    if len(values) else None)
    return out


def leave_largest_model_out(n, d, loss, starts: int = 32, delta: float = HUBER_DELTA,
                            size=None) -> dict:
    """Fits without the largest model's points and predicts them: the extrapolation error.
    `size` (default N) says which runs share a model: with N = average non-zero parameters a
    sparse run's N is smaller than its architecture's, so pass the dense count to hold out
    every run of the largest architecture, the same points for either law."""
    n, d, loss = (np.asarray(x, float) for x in (n, d, loss))
    size = n if size is None else np.asarray(size, float)
    largest = size.max()
    held = np.isclose(size, largest, rtol=1e-9)
    keep = ~held
    if len(np.unique(n[keep])) < 2 or len(np.unique(d[keep])) < 2 or keep.sum() < 3:
        return {"held_out_n": float(largest), "skipped":
                "without the largest model fewer than 2 model sizes (or token budgets, or 3 "
                "points) remain, so the law cannot be fitted; sweep at least 3 sizes"}
    # Grid starts only: starting at the full fit's optimum would leak the held-out points.
    law = fit_law(n[keep], d[keep], loss[keep], delta, starts).law
    predicted = law.loss(n[held], d[held])
    rel = (predicted - loss[held]) / loss[held]
    return {"held_out_n": float(largest), "points": int(held.sum()),
            "fit_without": law.as_dict(),
            "mean_abs_relative_error": float(np.mean(np.abs(rel))),
            "max_abs_relative_error": float(np.max(np.abs(rel))),
            "predictions": [{"n": float(x), "tokens": float(t), "loss": float(y),
                             "predicted": float(p)}
                            for x, t, y, p in zip(n[held], d[held], loss[held], predicted)]}
