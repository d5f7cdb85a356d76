"""Reading a runs table (CSV) for fits and plots, with one-line errors for bad input.

Needed columns: `params` (law `chinchilla`) or `avg_params` (law `avg-params`), `tokens` and
`loss`; `flops` is used by the plots when present (otherwise 6 N D). Any other column (the
swept values of `spjax sweep collect`) may be used to select rows with `--where key=value`.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path

import numpy as np

from spjax.errors import FitError

LAW_N_COLUMN = {"chinchilla": "params", "avg-params": "avg_params"}
MIN_POINTS = 4


@dataclasses.dataclass(frozen=True)
class RunsTable:
    path: Path
    columns: tuple[str, ...]
    rows: tuple[dict[str, str], ...]

    def has(self, column: str) -> bool:
        return column in self.columns

    def strings(self, column: str) -> list[str]:
        return [row.get(column) or "" for row in self.rows]

    def numbers(self, column: str, why: str = "", positive: bool = True) -> np.ndarray:
        """A numeric column; a missing column or a bad cell is a FitError naming both."""
        if column not in self.columns:
            raise FitError(f"{self.path}: column '{column}' is missing{why}; columns are "
                           f"{self.column_list()} (spjax sweep collect writes them all)")
        values = []
        for i, row in enumerate(self.rows, start=2):  # line 1 is the header
            cell = (row.get(column) or "").strip()
            try:
                value = float(cell)
            except ValueError:
                raise FitError(f"{self.path}: line {i}: '{column}' is {cell!r}, not a number; "
                               f"fix or delete that row") from None
            if not math.isfinite(value) or (positive and value <= 0):
                raise FitError(f"{self.path}: line {i}: '{column}' is {cell}, but it must be a "
                               f"finite number > 0 (it is used in logarithms); fix or delete "
                               f"that row")
            values.append(value)
        return np.array(values)

    def column_list(self, limit: int = 200) -> str:
        """The header, comma-separated, cut at `limit` characters (a file that is not CSV
        has one long header cell)."""
        text = ", ".join(self.columns)
        return text if len(text) <= limit else f"{text[:limit]}... (is it a CSV file?)"

    def select(self, keep: np.ndarray) -> "RunsTable":
        return dataclasses.replace(self, rows=tuple(r for r, k in zip(self.rows, keep) if k))


def read_table(path: str | Path) -> RunsTable:
    path = Path(path)
    if not path.is_file():
        raise FitError(f"runs table '{path}' " + ("is a directory" if path.is_dir() else
                                                  "does not exist") +
                       "; write one with `spjax sweep collect SPEC`")
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            columns = tuple(c.strip() for c in reader.fieldnames or ())
            rows = tuple({k.strip(): v for k, v in row.items() if k is not None}
                         for row in reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise FitError(f"runs table '{path}' is not a readable CSV file ({e})") from None
    if not columns:
        raise FitError(f"runs table '{path}' is empty; it needs a header line with params, "
                       f"tokens and loss columns, and one row per run")
    return RunsTable(path, columns, rows)


def where(table: RunsTable, conditions: list[str]) -> RunsTable:
    """Rows whose column equals the value for every `column=value` condition."""
    for condition in conditions:
        column, sep, value = condition.partition("=")
        if not sep or not column:
            raise FitError(f"--where '{condition}' must look like column=value, e.g. "
                           f"sparsity_method=none")
        if column not in table.columns:
            raise FitError(f"--where '{condition}': {table.path} has no column '{column}'; "
                           f"columns are {table.column_list()}")
        keep = np.array([_same(cell, value) for cell in table.strings(column)], bool)
        table = table.select(keep)
    return table


def _same(cell: str, value: str) -> bool:
    if cell.strip() == value.strip():
        return True
    try:  # 0.5 == 0.50, 1000 == 1e3
        return float(cell) == float(value)
    except ValueError:
        return False


def fit_arrays(table: RunsTable, law: str,
               exclude_top_loss: int = 0) -> tuple[RunsTable, np.ndarray, np.ndarray, np.ndarray]:
    """(rows kept, N, D, L) for `law`, after dropping the `exclude_top_loss` highest losses
    (Besiroglu et al. drop the 5 largest-loss outliers, e.g. diverged runs)."""
    if law not in LAW_N_COLUMN:
        raise FitError(f"unknown law '{law}'; choose one of {', '.join(LAW_N_COLUMN)}")
    n_column = LAW_N_COLUMN[law]
    hint = (f" (law '{law}' takes N from it; "
            + ("use --law avg-params for avg_params)" if law == "chinchilla"
               else "use --law chinchilla for the dense count in params)"))
    n = table.numbers(n_column, hint)
    d = table.numbers("tokens")
    loss = table.numbers("loss")
    if exclude_top_loss < 0:
        raise FitError(f"--exclude-top-loss must be >= 0, got {exclude_top_loss}")
    if exclude_top_loss:
        keep = np.ones(len(loss), bool)
        keep[np.argsort(-loss, kind="stable")[:exclude_top_loss]] = False
        table, n, d, loss = table.select(keep), n[keep], d[keep], loss[keep]
    dropped = f" after --exclude-top-loss {exclude_top_loss}" if exclude_top_loss else ""
    if len(loss) < MIN_POINTS:
        raise FitError(f"{table.path}: {len(loss)} runs{dropped}; the fit needs at least "
                       f"{MIN_POINTS} (it has 5 constants; 6 or more runs pin them down)")
    for name, values, what in ((n_column, n, "model sizes"), ("tokens", d, "token budgets")):
        if len(np.unique(values)) < 2:
            raise FitError(f"{table.path}: every run has the same '{name}' ({values[0]:g}); "
                           f"the fit needs at least 2 {what}")
    return table, n, d, loss
