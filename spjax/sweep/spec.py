"""Sweep specs: a base config plus grid and zip axes over config keys, expanded into points.

    # configs/sweeps/example.yaml
    base: ../tiny.yaml              # the config every point starts from (relative to this file)
    out: runs/sweeps/example        # one run dir per point under here (relative to the cwd)
    overrides:                      # applied to every point
      train.eval_every: 0
    grid:                           # cartesian product of these axes
      train.steps: [1000, 3000]
      sparsity.sparsity: [0.5, 0.75]
    zip:                            # parallel lists of equal length: one axis of tuples
      model.d_model: [256, 512]
      model.n_layers: [4, 8]
    slurm: {partition: gpu, time: "01:00:00", gpus_per_node: 1}   # for --runner slurm

`zip` may also be a list of such mappings (several zipped axes). All axes combine as one
cartesian product: the points above are 2 x 2 x 2 = 8. Each point's run dir is named by its
swept values in axis order, e.g. `train.steps=1000,sparsity.sparsity=0.5,model.d_model=256,
model.n_layers=4`, so the same spec always maps a point to the same dir (that is what makes a
re-run skip and resume).

Order of application: whole-section values (keys without a dot, e.g. `model: 60m` or
`sparsity: rigl`, which replace their whole section), then dotted keys, each group with the
common overrides first and the point's swept values after. Otherwise a swept `model: [60m,
130m]` would wipe a common `model.vocab_size: 0`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import re
from pathlib import Path
from typing import Any

import yaml

from spjax.config import Config, load_config
from spjax.errors import SpjaxError, SweepError

SPEC_KEYS = ("base", "out", "overrides", "grid", "zip", "slurm")
# Run-dir names keep only these characters; anything else (spaces, '/', quotes) becomes '_'.
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]")
# Long names (many zipped keys) are cut and made unique with a hash of the full name: most
# filesystems cap a name at 255 bytes.
MAX_NAME = 180


@dataclasses.dataclass(frozen=True)
class SlurmOptions:
    """sbatch options of `--runner slurm`; every point is one task of one job array."""

    partition: str = ""
    time: str = ""  # e.g. "02:00:00"; empty: the partition's default
    nodes: int = 1
    ntasks_per_node: int = 1  # > 1: one jax process per task (srun), as launch/spjax.sbatch
    cpus_per_task: int = 0  # 0: SLURM's default
    gpus_per_node: int = 0  # 0: do not ask for GPUs
    sbatch_args: tuple[str, ...] = ()  # anything else, verbatim, e.g. ["--account=abc"]


@dataclasses.dataclass(frozen=True)
class Point:
    """One run of the sweep: its swept values, its train overrides and its run dir."""

    index: int
    name: str
    values: tuple[tuple[str, Any], ...]  # swept key -> value, in axis order
    overrides: tuple[str, ...]  # `key=value` for `spjax train`, in application order
    run_dir: Path

    @property
    def log(self) -> Path:
        return self.run_dir / "sweep.log"

    def train_args(self) -> list[str]:
        # Progress bars would fill the log with carriage returns; the runner shows progress.
        return [*self.overrides, "train.progress=false", f"run_dir={self.run_dir}"]


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    path: Path
    base: Path
    out: Path
    overrides: tuple[tuple[str, Any], ...]
    grid: tuple[tuple[str, tuple[Any, ...]], ...]
    zips: tuple[tuple[tuple[str, tuple[Any, ...]], ...], ...]
    slurm: SlurmOptions = SlurmOptions()

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def axis_keys(self) -> list[str]:
        return [k for k, _ in self.grid] + [k for group in self.zips for k, _ in group]

    def points(self) -> list[Point]:
        """Every point, in a stable order: the grid's first axis varies slowest."""
        # One axis per grid key and one per zip group; a zip axis's value is a row of values.
        axes: list[list[tuple[tuple[str, Any], ...]]] = [
            [((key, v),) for v in values] for key, values in self.grid]
        for group in self.zips:
            length = len(group[0][1])
            axes.append([tuple((key, values[i]) for key, values in group) for i in range(length)])
        points, seen = [], {}
        for index, combo in enumerate(itertools.product(*axes)):
            values = tuple(pair for row in combo for pair in row)
            name = point_name(values)
            if name in seen:
                raise SweepError(f"points {seen[name]} and {dict(values)} get the same run dir "
                                 f"name '{name}'; make the swept values differ in more than "
                                 f"punctuation")
            seen[name] = dict(values)
            points.append(Point(index, name, values, _ordered_overrides(self.overrides, values),
                                self.out / name))
        return points

    def point_config(self, point: Point) -> Config:
        """The point's full config, loaded and validated exactly as `spjax train` will."""
        try:
            return load_config(self.base, point.train_args())
        except SpjaxError as e:
            raise SweepError(f"{self.path}: point '{point.name}': {e}") from None


def load_spec(path: str | Path, out: str | Path | None = None) -> SweepSpec:
    """Reads and checks a spec file; `out` replaces the spec's output folder."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep spec '{path}' " + ("is a directory; give a YAML file" if
                                                    path.is_dir() else "does not exist"))
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise SweepError(f"sweep spec '{path}' cannot be read ({e.strerror})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        at = f" at line {line + 1}" if line is not None else ""
        raise SweepError(f"sweep spec '{path}' is not valid YAML{at}") from None
    if not isinstance(raw, dict):
        raise SweepError(f"sweep spec '{path}' must be a mapping with keys {', '.join(SPEC_KEYS)}")
    unknown = sorted(set(raw) - set(SPEC_KEYS))
    if unknown:
        raise SweepError(f"{path}: unknown key '{unknown[0]}'; valid keys: {', '.join(SPEC_KEYS)}")
    if "base" not in raw:
        raise SweepError(f"{path}: 'base' is missing; set it to the config every point starts "
                         f"from, relative to the spec, e.g. base: ../tiny.yaml")
    base = Path(str(raw["base"]))
    base = base if base.is_absolute() else path.parent / base
    if not base.is_file():
        raise SweepError(f"{path}: base config '{raw['base']}' not found at {base} (paths are "
                         f"relative to the spec file's folder)")
    out_dir = Path(str(out if out is not None else raw.get("out") or f"runs/sweeps/{path.stem}"))

    overrides = _overrides(path, raw.get("overrides"))
    grid = tuple(_axis(path, "grid", key, values) for key, values in
                 _mapping(path, "grid", raw.get("grid")).items())
    zips_raw = raw.get("zip") or []
    groups = zips_raw if isinstance(zips_raw, list) else [zips_raw]
    zips = []
    for i, group in enumerate(groups):
        where = "zip" if isinstance(zips_raw, dict) else f"zip[{i}]"
        axes = tuple(_axis(path, where, key, values)
                     for key, values in _mapping(path, where, group).items())
        if not axes:
            raise SweepError(f"{path}: '{where}' is empty; give it key: [values] entries")
        lengths = {key: len(values) for key, values in axes}
        if len(set(lengths.values())) > 1:
            raise SweepError(f"{path}: '{where}' lists must have equal lengths, got "
                             f"{', '.join(f'{k}: {n}' for k, n in lengths.items())}; zip pairs "
                             f"the i-th values of every key (use 'grid' for all combinations)")
        zips.append(axes)

    seen: dict[str, str] = {key: "overrides" for key, _ in overrides}
    for where, key in [("grid", k) for k, _ in grid] + [("zip", k) for g in zips for k, _ in g]:
        if key in seen:
            raise SweepError(f"{path}: key '{key}' appears in both '{seen[key]}' and '{where}'; "
                             f"keep it in one place")
        seen[key] = where
    return SweepSpec(path=path, base=base.resolve(), out=out_dir.absolute(), overrides=overrides,
                     grid=grid, zips=tuple(zips), slurm=_slurm(path, raw.get("slurm")))


def point_name(values: tuple[tuple[str, Any], ...]) -> str:
    """`key=value,key=value` with unsafe characters replaced; 'base' for a sweep of one."""
    if not values:
        return "base"
    name = _UNSAFE.sub("_", ",".join(f"{k}={format_value(v)}" for k, v in values))
    if len(name) > MAX_NAME:
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = f"{name[:MAX_NAME - 11]}-{digest}"
    return name


def format_value(value: Any) -> str:
    """A value as it reads in names and CSV cells: YAML-style scalars, compact JSON otherwise."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float, str)):
        return str(value)
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def override(key: str, value: Any) -> str:
    """`key=value` that `load_config` parses back to exactly `value` (strings stay strings)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf).strip()
    if text.endswith("\n..."):
        text = text[:-4].strip()
    elif text.endswith("..."):  # a bare scalar document: 'x\n...'
        text = text[:-3].strip()
    return f"{key}={text}"


def _ordered_overrides(common: tuple[tuple[str, Any], ...],
                       values: tuple[tuple[str, Any], ...]) -> tuple[str, ...]:
    pairs = list(common) + list(values)
    sections = [override(k, v) for k, v in pairs if "." not in k]
    dotted = [override(k, v) for k, v in pairs if "." in k]
    return tuple(sections + dotted)


def _check_key(path: Path, where: str, key: Any) -> str:
    if not isinstance(key, str) or not key or key != key.strip():
        raise SweepError(f"{path}: '{where}' key {key!r} must be a dotted config key, e.g. "
                         f"train.steps")
    if key == "run_dir" or key.startswith("run_dir."):
        raise SweepError(f"{path}: '{where}' must not set run_dir: the sweep gives every point "
                         f"its own; set the spec's 'out' instead")
    return key


def _mapping(path: Path, where: str, raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: '{where}' must be a mapping of config keys to lists of "
                         f"values, got {type(raw).__name__}")
    return raw


def _axis(path: Path, where: str, key: Any, values: Any) -> tuple[str, tuple[Any, ...]]:
    key = _check_key(path, where, key)
    if not isinstance(values, list) or not values:
        raise SweepError(f"{path}: '{where}.{key}' must be a non-empty list of values, e.g. "
                         f"{key}: [1, 2], got {values!r}")
    return key, tuple(values)


def _overrides(path: Path, raw: Any) -> tuple[tuple[str, Any], ...]:
    """A mapping {key: value}, or a list of 'key=value' strings as on the command line."""
    if raw is None:
        return ()
    if isinstance(raw, dict):
        return tuple((_check_key(path, "overrides", k), v) for k, v in raw.items())
    if isinstance(raw, list):
        pairs = []
        for item in raw:
            key, sep, text = str(item).partition("=")
            if not sep or not key.strip():
                raise SweepError(f"{path}: overrides entry {item!r} must look like key=value")
            pairs.append((_check_key(path, "overrides", key.strip()),
                          yaml.safe_load(text) if text.strip() else ""))
        return tuple(pairs)
    raise SweepError(f"{path}: 'overrides' must be a mapping (key: value) or a list of "
                     f"'key=value' strings")


def _slurm(path: Path, raw: Any) -> SlurmOptions:
    raw = _mapping(path, "slurm", raw)
    names = [f.name for f in dataclasses.fields(SlurmOptions)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise SweepError(f"{path}: unknown key 'slurm.{unknown[0]}'; valid keys: "
                         f"{', '.join(names)}")
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        default = getattr(SlurmOptions, name)
        if isinstance(default, int):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise SweepError(f"{path}: 'slurm.{name}' must be an integer >= 0, got {value!r}")
        elif isinstance(default, tuple):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise SweepError(f"{path}: 'slurm.{name}' must be a list of strings, e.g. "
                                 f"['--account=abc'], got {value!r}")
            value = tuple(value)
        else:
            value = str(value)
        kwargs[name] = value
    options = SlurmOptions(**kwargs)
    if options.nodes < 1 or options.ntasks_per_node < 1:
        raise SweepError(f"{path}: 'slurm.nodes' and 'slurm.ntasks_per_node' must be >= 1")
    return options
