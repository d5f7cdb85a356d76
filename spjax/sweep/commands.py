"""The `spjax sweep` and `spjax fit` subcommands (argument parsing and reporting only).

    spjax sweep SPEC [--runner local|slurm] [--parallel N] [--gpus G] [--out DIR] [--dry-run]
    spjax sweep collect SPEC [--out DIR] [--csv PATH]
    spjax fit RUNS.csv [--law chinchilla|avg-params] [--exclude-top-loss K] [--out fit.json]
              [--bootstrap 200] [--starts 32] [--where column=value ...] [--no-plots]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from spjax.errors import SweepError


def add_parsers(commands: Any) -> None:
    sweep = commands.add_parser(
        "sweep", help="run a sweep spec's points, or collect their results into a CSV",
        usage="spjax sweep SPEC [--runner local|slurm] [--parallel N] [--gpus G] [--out DIR] "
              "[--dry-run]\n"
              "       spjax sweep collect SPEC [--out DIR] [--csv PATH]")
    sweep.add_argument("target", metavar="SPEC|collect",
                       help="a sweep spec (YAML, e.g. configs/sweeps/tiny_cpu.yaml), or "
                            "'collect' followed by one")
    sweep.add_argument("spec", nargs="?", metavar="SPEC", help="the spec to collect")
    sweep.add_argument("--runner", choices=("local", "slurm"), default="local",
                       help="local: subprocesses here (default); slurm: one sbatch job array")
    sweep.add_argument("--parallel", type=int, default=None,
                       help="points at once: local processes (default 1) or SLURM array tasks "
                            "(default: as many as SLURM allows)")
    sweep.add_argument("--gpus", type=int, default=0,
                       help="local: the host's GPU count; each of the --parallel points gets "
                            "its own G/N of them, or N/G points share each GPU (default 0: "
                            "points share the visible GPUs)")
    sweep.add_argument("--out", help="folder of the run dirs (default: the spec's 'out')")
    sweep.add_argument("--csv", help="collect: the table to write (default OUT/runs.csv)")
    sweep.add_argument("--dry-run", action="store_true",
                       help="list the points, their run dirs and status; run nothing")
    sweep.add_argument("--progress-every", type=float, default=30.0, metavar="SECONDS",
                       help="how often to print each running point's step (default 30)")
    sweep.set_defaults(run=_sweep)

    fit = commands.add_parser("fit", help="fit a scaling law L = E + A/N^alpha + B/D^beta to a "
                                          "runs table and plot it")
    fit.add_argument("csv", metavar="RUNS.csv",
                     help="runs table with params (or avg_params), tokens, loss columns")
    fit.add_argument("--law", choices=("chinchilla", "avg-params"), default="chinchilla",
                     help="N = params (chinchilla, default) or avg_params, the average "
                          "non-zero count over training ('The Journey Matters')")
    fit.add_argument("--exclude-top-loss", type=int, default=0, metavar="K",
                     help="drop the K runs with the highest loss first (outliers)")
    fit.add_argument("--out", help="fit JSON (default: fit.json beside RUNS.csv); plots are "
                                   "written beside it")
    fit.add_argument("--bootstrap", type=int, default=200, metavar="R",
                     help="resamples for the 95%% confidence intervals (default 200; 0: none)")
    fit.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    fit.add_argument("--starts", type=int, default=32,
                     help="L-BFGS runs from the best points of Chinchilla's 4500-point grid "
                          "(default 32; 0: all 4500)")
    fit.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE",
                     help="fit only rows with this value (repeatable), e.g. "
                          "sparsity_method=none")
    fit.add_argument("--no-plots", action="store_true", help="write fit.json only")
    fit.set_defaults(run=_fit)


def _sweep(args: argparse.Namespace) -> int:
    from spjax.sweep.spec import load_spec

    collecting = args.target == "collect"
    if collecting and not args.spec:
        raise SweepError("'spjax sweep collect' needs the spec: spjax sweep collect SPEC")
    if not collecting and args.spec:
        raise SweepError(f"unexpected argument '{args.spec}' after the spec (to collect, run "
                         f"spjax sweep collect SPEC)")
    if args.parallel is not None and args.parallel < 1:
        raise SweepError(f"--parallel must be >= 1, got {args.parallel}")
    if args.gpus < 0 or (args.gpus and args.runner != "local"):
        raise SweepError(f"--gpus ({args.gpus}) must be >= 0 and is for --runner local; SLURM "
                         f"gives each array task its GPUs itself")
    spec = load_spec(args.spec if collecting else args.target, out=args.out)
    if collecting:
        from spjax.sweep.collect import collect

        path, rows, missing = collect(spec, args.csv)
        print(f"spjax: wrote {path}: {len(rows)} finished runs")
        if missing:
            print(f"spjax: {len(missing)} points not finished (left out): {', '.join(missing)}")
        return 0
    if args.csv:
        raise SweepError("--csv belongs to 'spjax sweep collect SPEC'")
    from spjax.sweep.run import run_sweep
    from spjax.sweep.runners import SweepInterrupted, describe, display, plan

    if args.dry_run:
        planned = plan(spec)
        print(f"sweep {spec.name}: {describe(planned)}")
        for p in planned:
            state = p.status.kind + (f" (step {p.status.step})" if p.status.step else "")
            print(f"  {state:<18} {display(p.point.run_dir)}")
        return 0
    parallel = args.parallel if args.parallel is not None else (1 if args.runner == "local"
                                                                 else 0)
    try:
        return run_sweep(spec, args.runner, parallel, progress_every=args.progress_every,
                         gpus=args.gpus)
    except SweepInterrupted as e:
        print(f"spjax: {e}", file=sys.stderr)
        return 130


def fit_runs(csv_path: str | Path, law: str = "chinchilla", exclude_top_loss: int = 0,
             out: str | Path | None = None, resamples: int = 200, seed: int = 0,
             starts: int = 32, where: list[str] | None = None,
             plots: bool = True) -> dict[str, Any]:
    """Fits the table, writes fit.json (and the plots beside it); returns what it wrote."""
    import numpy as np

    from spjax.errors import FitError, not_a_directory
    from spjax.sweep import fit as fitlib
    from spjax.sweep import table as tablelib

    if resamples < 0 or starts < 0:
        raise FitError("--bootstrap and --starts must be >= 0")
    out = Path(out) if out else Path(csv_path).with_name("fit.json")
    problem = not_a_directory(out.parent)
    if problem:  # before the fit, which can take minutes
        raise FitError(f"--out {out}: cannot write it ({problem}); choose another --out")
    full = tablelib.read_table(csv_path)
    chosen = tablelib.where(full, where or [])
    kept, n, d, loss = tablelib.fit_arrays(chosen, law, exclude_top_loss)
    excluded = [r for r in chosen.rows if r not in kept.rows]
    result = fitlib.fit_law(n, d, loss, starts=starts)
    law_fit = result.law
    rel = (law_fit.loss(n, d) - loss) / loss
    report: dict[str, Any] = {
        "law": law,
        "formula": "L = E + A / N^alpha + B / D^beta",
        "N": tablelib.LAW_N_COLUMN[law], "D": "tokens", "L": "loss",
        **law_fit.as_dict(),
        "log_params": dict(zip(fitlib.NAMES, map(float, result.theta))),
        "confidence_intervals": None,
        "leave_largest_model_out": fitlib.leave_largest_model_out(
            n, d, loss, starts=starts, size=kept.numbers("params") if kept.has("params") else n),
        "compute_optimal": _compute_optimal(law_fit),
        "points": len(loss),
        # 5 constants: with 5 runs or fewer the law fits exactly and its constants are not
        # pinned down; the numbers are then a description, not a law to extrapolate.
        "underdetermined": bool(len(loss) <= 5),
        "fit": {"objective": "sum Huber_delta(log L_hat - log L)", "huber_delta":
                fitlib.HUBER_DELTA, "value": result.objective, "lbfgs_starts": result.starts,
                "converged": result.converged, "at_bound": list(result.at_bound),
                "rms_relative_error": float(np.sqrt(np.mean(rel ** 2))),
                "max_abs_relative_error": float(np.max(np.abs(rel)))},
        "table": str(csv_path), "where": list(where or []),
        "excluded_top_loss": [{k: r.get(k) for k in ("run", "loss") if k in r}
                              for r in excluded],
        "plots": [],
    }
    if resamples:
        report["confidence_intervals"] = fitlib.bootstrap(n, d, loss, result, resamples, seed)
    if plots:
        from spjax.sweep import plots as plotlib

        out.parent.mkdir(parents=True, exist_ok=True)
        written = [plotlib.loss_vs_flops(kept, n, d, loss, law_fit, law,
                                         out.with_name(f"{out.stem}_loss_vs_flops.png")),
                   plotlib.sparse_vs_dense(full, out.with_name(f"{out.stem}_sparse_vs_dense.png"))]
        report["plots"] = [str(p) for p in written if p is not None]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out)
    report["path"] = str(out)
    return report


def _compute_optimal(law: Any) -> dict[str, float] | None:
    """N_opt = G (C/k)^a, D_opt = (C/k)^b / G for C = k N D (k = 6 for C = 6ND)."""
    if law.alpha <= 0 or law.beta <= 0:
        return None
    s = law.alpha + law.beta
    return {"a": law.beta / s, "b": law.alpha / s,
            "G": (law.alpha * law.A / (law.beta * law.B)) ** (1 / s)}


def _fit(args: argparse.Namespace) -> int:
    report = fit_runs(args.csv, args.law, args.exclude_top_loss, args.out, args.bootstrap,
                      args.seed, args.starts, args.where, not args.no_plots)
    print(f"spjax: {report['law']} fit of {report['points']} runs: L = {report['E']:.4g} + "
          f"{report['A']:.4g}/N^{report['alpha']:.4f} + {report['B']:.4g}/D^{report['beta']:.4f}"
          f" (rms relative error {report['fit']['rms_relative_error']:.2%})")
    ci = report["confidence_intervals"]
    if ci:
        parts = [f"{k} [{ci[k][0]:.4g}, {ci[k][1]:.4g}]" for k in ("E", "A", "B", "alpha", "beta")
                 if ci[k] is not None]
        print(f"spjax: {ci['level']:.0%} bootstrap intervals ({ci['resamples']} resamples): "
              f"{', '.join(parts)}")
    held = report["leave_largest_model_out"]
    if "skipped" in held:
        print(f"spjax: leave-largest-model-out: skipped: {held['skipped']}")
    else:
        print(f"spjax: leave-largest-model-out (N = {held['held_out_n']:.4g}): mean relative "
              f"error {held['mean_abs_relative_error']:.2%}, max "
              f"{held['max_abs_relative_error']:.2%}")
    if report["underdetermined"]:
        print(f"spjax: warning: {report['points']} runs for 5 constants: the law fits them "
              f"exactly and is not pinned down; sweep more points before extrapolating",
              file=sys.stderr)
    if report["fit"]["at_bound"]:
        print(f"spjax: warning: {', '.join(report['fit']['at_bound'])} ended at a bound of "
              f"the search; the data do not determine it", file=sys.stderr)
    print(f"spjax: wrote {report['path']}" + "".join(f", {p}" for p in report["plots"]))
    return 0
