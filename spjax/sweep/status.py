"""Where each point of a sweep stands, read from its run dir alone (no jax, no training).

- `done`: summary.json exists and reports the configured number of steps. Skipped on re-run.
- `partial`: checkpoints exist but no finished summary. A re-run resumes from the last
  checkpoint (`spjax train` does that by itself on the same run dir).
- `pending`: nothing yet.

Every point's run dir holds `sweep_point.json`, written before its first attempt, with the
config it was started with. A later run of a changed spec that maps a different config to
the same dir is refused instead of silently resuming (or skipping) the wrong run.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Literal

from spjax.config import Config, to_dict
from spjax.errors import SweepError
from spjax.tree import nest_paths
from spjax.sweep.spec import Point, format_value

MARKER = "sweep_point.json"
# Keys that do not change what is trained, so a spec may change them between re-runs.
_IGNORED = ("run_dir", "train.progress", "train.log_every", "train.keep_checkpoints")


@dataclasses.dataclass(frozen=True)
class Status:
    kind: Literal["done", "partial", "pending"]
    step: int | None = None  # last checkpoint step (partial)
    summary: dict[str, Any] | None = None  # done


def point_status(point: Point, config: Config) -> Status:
    summary = read_summary(point.run_dir)
    if summary is not None and int(summary.get("steps") or 0) >= config.train.steps:
        return Status("done", summary=summary)
    step = last_checkpoint(point.run_dir)
    if step is not None:
        return Status("partial", step=step)
    return Status("pending")


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None  # absent, or being written right now: not finished
    return summary if isinstance(summary, dict) else None


def last_checkpoint(run_dir: Path) -> int | None:
    """The highest step with a checkpoint folder (orbax names them by step)."""
    folder = run_dir / "checkpoints"
    steps = [int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()] \
        if folder.is_dir() else []
    return max(steps) if steps else None


def last_step(run_dir: Path) -> int | None:
    """The last logged training step, from the tail of metrics.jsonl (for progress lines)."""
    path = run_dir / "metrics.jsonl"
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return None


def _comparable(config: Config) -> dict[str, Any]:
    flat = _flatten(json.loads(json.dumps(to_dict(config))))
    return {k: v for k, v in flat.items() if k not in _IGNORED}


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else key))
        return out
    return {prefix: tree}


def check_marker(point: Point, config: Config) -> None:
    """Raises if the run dir was started by a different config than this point's."""
    path = point.run_dir / MARKER
    try:
        marker = json.loads(path.read_text())
        old = _flatten(marker["config"])
    except FileNotFoundError:
        return
    except (OSError, ValueError, KeyError, TypeError):
        raise SweepError(f"{path} is unreadable; delete it if {point.run_dir} belongs to this "
                         f"sweep, or delete the whole run dir to retrain the point") from None
    new = _comparable(config)
    old = {k: v for k, v in old.items() if k not in _IGNORED}
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            raise SweepError(
                f"{point.run_dir} was started with {key}={format_value(old.get(key))} but the "
                f"spec now gives {key}={format_value(new.get(key))}; delete that run dir to "
                f"retrain the point, or set --out to a fresh folder")


def write_marker(point: Point, config: Config, spec_path: Path) -> None:
    point.run_dir.mkdir(parents=True, exist_ok=True)
    marker = {"spec": str(spec_path), "name": point.name,
              "values": {k: v for k, v in point.values}, "overrides": list(point.overrides),
              "config": nest_paths(_comparable(config), sep=".")}
    tmp = point.run_dir / f".{MARKER}.tmp"
    tmp.write_text(json.dumps(marker, indent=2) + "\n")
    os.replace(tmp, point.run_dir / MARKER)  # atomic: a marker is whole or absent
