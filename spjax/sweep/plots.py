"""Scaling-law plots (PNG, matplotlib's Agg backend: no display needed).

- `loss_vs_flops`: final loss against training FLOPs, one colour per model size, each with
  its fitted law curve L(N, D) as D grows, and the compute-optimal frontier: for each budget
  C the minimum of L(N, D) subject to C = k N D. k is the table's median FLOPs / (N D) (6 for
  the plain 6ND count; more with attention, less with sparsity); without a `flops` column
  C = 6 N D.
- `sparse_vs_dense`: loss against FLOPs per sparsity level, with each level's best loss at
  or below each budget (its Pareto frontier), so levels compare at equal FLOPs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from spjax.errors import FitError
from spjax.sweep.fit import Law
from spjax.sweep.table import RunsTable


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: works on headless nodes
    import matplotlib.pyplot as plt

    return plt


def _flops(table: RunsTable, n, d) -> tuple[np.ndarray, str]:
    if table.has("flops"):
        return table.numbers("flops"), "training FLOPs"
    return 6 * n * d, "training FLOPs (6 N D)"


def _axes(ax, xlabel: str) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.set_xscale("log")
    ax.set_yscale("log")
    plain = FuncFormatter(lambda y, _: f"{y:g}")  # '3.5', not '3.5 x 10^0'
    # Losses span less than a decade: label 1.2, 1.4, ... too, or 1-2 has no label at all.
    ax.yaxis.set_minor_locator(LogLocator(subs=(1.2, 1.4, 1.6, 1.8, 2, 2.5, 3, 4, 5, 6, 7, 8,
                                                9)))
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("final validation loss (nats/token)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def _fmt(x: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def loss_vs_flops(table: RunsTable, n: np.ndarray, d: np.ndarray, loss: np.ndarray, law: Law,
                  law_name: str, path: Path) -> Path:
    plt = _pyplot()
    flops, xlabel = _flops(table, n, d)
    sizes = np.unique(n)
    colors = plt.get_cmap("viridis")(np.linspace(0.0, 0.85, len(sizes)))
    fig, ax = plt.subplots(figsize=(7.5, 5.0), dpi=120)
    d_grid = np.geomspace(d.min() / 2, d.max() * 4, 100)
    for size, color in zip(sizes, colors):
        mine = n == size
        per_token = float(np.median(flops[mine] / d[mine]))  # the same model: FLOPs per token
        ax.scatter(flops[mine], loss[mine], color=color, s=30, zorder=3,
                   label=f"N = {_fmt(size)}")
        ax.plot(d_grid * per_token, law.loss(size, d_grid), color=color, lw=1.2, alpha=0.8)
    k = float(np.median(flops / (n * d)))
    c_grid = np.geomspace(flops.min() / 4, flops.max() * 16, 100)
    try:
        n_opt, d_opt = law.compute_optimal(c_grid / k)
        ax.plot(c_grid, law.loss(n_opt, d_opt), "k--", lw=1.5, label="compute-optimal frontier")
    except FitError:
        pass  # alpha or beta is 0: no interior optimum to draw
    _axes(ax, xlabel)
    ax.set_title(f"{law_name}: L = {law.E:.3g} + {law.A:.3g}/N^{law.alpha:.3f} + "
                 f"{law.B:.3g}/D^{law.beta:.3f}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def sparsity_labels(table: RunsTable) -> list[str] | None:
    """A label per row ('dense', 'gmp 75%', ...), or None when the table has no sparsity
    column (sweep collect's `sparsity_method`/`target_sparsity`, or a swept
    `sparsity.sparsity` / plain `sparsity` column)."""
    if table.has("sparsity_method") and table.has("target_sparsity"):
        methods = table.strings("sparsity_method")
        targets = table.numbers("target_sparsity", positive=False)
        return ["dense" if m in ("", "none") or t == 0 else f"{m} {t:.0%}"
                for m, t in zip(methods, targets)]
    for column in ("sparsity.sparsity", "sparsity"):
        if table.has(column):
            values = table.numbers(column, positive=False)
            return ["dense" if v == 0 else f"{v:.0%} sparse" for v in values]
    return None


def sparse_vs_dense(table: RunsTable, path: Path) -> Path | None:
    """Every row of the table (not just those a fit used); None (nothing written) without a
    sparsity column or with a single sparsity level."""
    labels = sparsity_labels(table)
    if labels is None or len(set(labels)) < 2:
        return None
    plt = _pyplot()
    loss = table.numbers("loss")
    if table.has("flops"):
        flops, xlabel = _flops(table, None, None)
    else:
        flops, xlabel = _flops(table, table.numbers("params"), table.numbers("tokens"))
    levels = sorted(set(labels), key=lambda s: (s != "dense", s))
    fig, ax = plt.subplots(figsize=(7.5, 5.0), dpi=120)
    for i, level in enumerate(levels):
        mine = np.array([label == level for label in labels])
        order = np.argsort(flops[mine])
        x, y = flops[mine][order], loss[mine][order]
        color = "black" if level == "dense" else plt.get_cmap("tab10")(i % 10)
        ax.scatter(x, y, color=color, s=30, zorder=3, label=level)
        ax.step(x, np.minimum.accumulate(y), where="post", color=color, lw=1.2, alpha=0.8)
    _axes(ax, xlabel)
    ax.set_title("sparse vs dense at equal FLOPs (lines: best loss at or below each budget)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
