"""Scaling-law fits: the fitter recovers known constants, and bad tables are one-line errors.

Synthetic data follow Besiroglu et al.'s Chinchilla replication (E 1.82, A 482, B 2085,
alpha 0.348, beta 0.366) on 5 model sizes x 6 token budgets.
"""

import csv
import json

import numpy as np
import pytest

from spjax.cli import main
from spjax.sweep.fit import Law, bootstrap, fit_law, leave_largest_model_out

TRUE = Law(E=1.82, A=482.0, B=2085.0, alpha=0.348, beta=0.366)
SIZES = np.array([1e7, 3e7, 1e8, 3e8, 1e9])
TOKENS = np.array([1e8, 3e8, 1e9, 3e9, 1e10, 3e10])


def _data(sigma: float, seed: int = 0):
    n, d = (x.ravel() for x in np.meshgrid(SIZES, TOKENS))
    noise = np.exp(np.random.default_rng(seed).normal(0.0, sigma, n.shape))
    return n, d, TRUE.loss(n, d) * noise


def test_fitter_recovers_exact_constants_from_noiseless_data():
    n, d, loss = _data(0.0)
    law = fit_law(n, d, loss, starts=8).law
    for key, want in TRUE.as_dict().items():
        assert getattr(law, key) == pytest.approx(want, rel=1e-3), key


def test_fitter_recovers_constants_from_noisy_data():
    """0.3% multiplicative noise on each loss (about the spread of final losses over seeds).

    Tolerances are about 4 standard deviations of each estimate, measured over 40 noise
    seeds (E 1.3%, alpha 0.007, beta 0.005, A 11%, B 9%; the law's worst error on the grid
    0.11%), so they fail when the fitter is wrong, not when the noise is unlucky. A and B are
    loose because they trade off against their exponents: the data see A / N^alpha at
    log N ~ 18, so an exponent off by 0.01 moves A by e^0.18 ~ 20%. What must hold whatever
    the trade-off is the law itself: it predicts the noiseless loss within 1% on the grid."""
    n, d, loss = _data(0.003, seed=0)
    result = fit_law(n, d, loss)
    law = result.law
    assert result.converged and not result.at_bound
    assert law.E == pytest.approx(TRUE.E, rel=0.05)
    assert law.alpha == pytest.approx(TRUE.alpha, abs=0.03)
    assert law.beta == pytest.approx(TRUE.beta, abs=0.02)
    assert law.A == pytest.approx(TRUE.A, rel=0.45)
    assert law.B == pytest.approx(TRUE.B, rel=0.35)
    assert np.max(np.abs(law.loss(n, d) / TRUE.loss(n, d) - 1)) < 0.01
    # Bootstrap intervals: around the estimate, and as wide as the noise makes them (a
    # resampling bug gives width 0, or intervals that miss the estimate).
    ci = bootstrap(n, d, loss, result, resamples=20, seed=0)
    assert ci["resamples"] == 20
    for key, value in law.as_dict().items():
        lo, hi = ci[key]
        assert lo < value < hi, f"{key}: {value} not in [{lo}, {hi}]"
    assert 0.005 < ci["alpha"][1] - ci["alpha"][0] < 0.1
    assert 0.01 < ci["E"][1] - ci["E"][0] < 0.3
    held = leave_largest_model_out(n, d, loss, starts=8)
    assert held["held_out_n"] == SIZES.max() and held["points"] == len(TOKENS)
    assert held["mean_abs_relative_error"] < 0.01  # extrapolating 3x in N, with 0.3% noise
    # Sparse runs of the largest model have a smaller N (average non-zero count) than its
    # dense runs: held out by model size, all of them go, not only the dense ones.
    sparse_n = np.where(np.arange(len(n)) % 2 == 0, n, 0.6 * n)
    by_size = leave_largest_model_out(sparse_n, d, loss, starts=8, size=n)
    assert by_size["points"] == len(TOKENS)
    assert {p["n"] for p in by_size["predictions"]} == set(sparse_n[n == SIZES.max()])
    assert leave_largest_model_out(sparse_n, d, loss, starts=8)["points"] < len(TOKENS)


def _write(path, rows, columns=None):
    columns = columns or list(rows[0])
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _table(sigma=0.003, sparse=False):
    n, d, loss = _data(sigma)
    rows = []
    for i, (ni, di, li) in enumerate(zip(n, d, loss)):
        row = {"run": f"r{i}", "params": ni, "avg_params": ni, "tokens": di, "loss": li,
               "flops": 6.3 * ni * di, "sparsity_method": "none", "target_sparsity": 0.0}
        rows.append(row)
        if sparse:  # a 75%-sparse twin: fewer average parameters, fewer FLOPs, higher loss
            avg = 0.4 * ni
            rows.append({**row, "run": f"s{i}", "avg_params": avg, "flops": 6.3 * avg * di,
                         "loss": TRUE.loss(avg, di), "sparsity_method": "gmp",
                         "target_sparsity": 0.75})
    return rows


def test_fit_cli_writes_the_law_intervals_extrapolation_and_plots(tmp_path, capsys):
    path = _write(tmp_path / "runs.csv", _table(sparse=True))
    out = tmp_path / "fits" / "dense.json"
    code = main(["fit", str(path), "--law", "chinchilla", "--where", "sparsity_method=none",
                 "--bootstrap", "5", "--starts", "8", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    fit = json.loads(out.read_text())
    for key in ("E", "A", "B", "alpha", "beta"):
        assert key in fit and key in fit["confidence_intervals"]
    assert fit["points"] == 30 and not fit["underdetermined"]
    assert fit["E"] == pytest.approx(TRUE.E, rel=0.02)
    assert fit["leave_largest_model_out"]["mean_abs_relative_error"] < 0.01
    assert fit["compute_optimal"]["a"] == pytest.approx(fit["beta"] / (fit["alpha"] +
                                                                       fit["beta"]))
    # Both plots: the sparse-vs-dense one reads the whole table, not just the fitted rows.
    assert sorted(p.rsplit("_", 1)[-1] for p in fit["plots"]) == ["dense.png", "flops.png"]
    for plot in fit["plots"]:
        data = open(plot, "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert "leave-largest-model-out" in printed


def test_avg_params_law_uses_the_average_count(tmp_path):
    """The sparse twins lie exactly on the true law in avg_params, and off it in params."""
    path = _write(tmp_path / "runs.csv", _table(sigma=0.0, sparse=True))
    for law, close in (("avg-params", True), ("chinchilla", False)):
        out = tmp_path / f"{law}.json"
        assert main(["fit", str(path), "--law", law, "--bootstrap", "0", "--starts", "8",
                     "--no-plots", "--out", str(out)]) == 0
        fit = json.loads(out.read_text())
        assert fit["N"] == ("avg_params" if law == "avg-params" else "params")
        assert (fit["fit"]["max_abs_relative_error"] < 1e-4) is close, fit["fit"]


def test_exclude_top_loss_drops_the_outliers(tmp_path):
    rows = _table()
    rows.append({**rows[0], "run": "diverged", "loss": 9.0})
    path = _write(tmp_path / "runs.csv", rows)
    out = tmp_path / "fit.json"
    assert main(["fit", str(path), "--exclude-top-loss", "1", "--bootstrap", "0",
                 "--starts", "8", "--no-plots", "--out", str(out)]) == 0
    fit = json.loads(out.read_text())
    assert fit["excluded_top_loss"] == [{"run": "diverged", "loss": "9.0"}]
    assert fit["points"] == 30 and fit["E"] == pytest.approx(TRUE.E, rel=0.02)


def _rows(k=6):
    return [{"params": 1e6 * (1 + i % 2), "avg_params": 1e6, "tokens": 1e7 * (1 + i // 2),
             "loss": 3.0 - 0.1 * i} for i in range(k)]


@pytest.mark.parametrize("rows, args, needle", [
    ([{k: v for k, v in r.items() if k != "loss"} for r in _rows()], [], "column 'loss' is "
     "missing"),
    ([{k: v for k, v in r.items() if k != "avg_params"} for r in _rows()],
     ["--law", "avg-params"], "column 'avg_params' is missing"),
    ([{**r, "tokens": 0 if i == 2 else r["tokens"]} for i, r in enumerate(_rows())], [],
     "line 4: 'tokens' is 0"),
    ([{**r, "loss": "nan" if i == 0 else r["loss"]} for i, r in enumerate(_rows())], [],
     "'loss' is nan"),
    ([{**r, "params": "big" if i == 1 else r["params"]} for i, r in enumerate(_rows())], [],
     "'params' is 'big', not a number"),
    (_rows(3), [], "3 runs; the fit needs at least 4"),
    (_rows(5), ["--exclude-top-loss", "2"], "3 runs after --exclude-top-loss 2"),
    ([{**r, "params": 1e6} for r in _rows()], [], "the same 'params'"),
    (_rows(), ["--where", "sparsity=0.5"], "no column 'sparsity'"),
])
def test_bad_tables_are_one_line_errors(tmp_path, capsys, rows, args, needle):
    path = _write(tmp_path / "runs.csv", rows)
    code = main(["fit", str(path), "--no-plots", *args])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spjax: error: ") and needle in lines[0], err
    assert not (tmp_path / "fit.json").exists()


def test_missing_or_empty_table_is_a_one_line_error(tmp_path, capsys):
    assert main(["fit", str(tmp_path / "nope.csv")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty.csv").write_text("")
    assert main(["fit", str(tmp_path / "empty.csv")]) == 2
    assert "is empty" in capsys.readouterr().err
