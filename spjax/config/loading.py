"""Reading a run config: YAML file + dotted `key=value` overrides, strictly validated.

`load_config(path, overrides)` reads the YAML, expands section presets (`model: 60m` or
`model: {preset: 60m, vocab_size: 32000}` read `configs/models/60m.yaml`; likewise
`sparsity: rigl` reads `configs/methods/rigl.yaml` and `lowrank: sltrain`
`configs/lowrank/sltrain.yaml`), applies overrides in order, builds the section dataclasses
and validates them. Unknown keys, ill-typed values and out-of-range values raise
`ConfigError` naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from spjax.config.run import Config
from spjax.errors import ConfigError

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"

def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Reads YAML (or starts from defaults when path is None), applies overrides, validates."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path), "config file")
    raw = _expand_presets(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. train.steps=100)")
        _set_dotted(raw, key.strip(), _override_value(key.strip(), text))
        raw = _expand_presets(raw)
    config = from_dict(Config, raw)
    config.validate()
    return config


def _override_value(key: str, text: str) -> Any:
    """The YAML value of override `key=text` ('' when empty)."""
    if not text.strip():
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ConfigError(f"override '{key}': value {text!r} is not valid YAML ({problem}); "
                          f"close its brackets, or quote a string ({key}='\"...\"')") from None


def to_dict(config: Any) -> Any:
    """Dataclass -> plain YAML-able dict (tuples become lists)."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (tuple, list)):
        return [to_dict(v) for v in config]
    return config


def from_dict(cls: type, raw: Any, prefix: str = "") -> Any:
    """Builds dataclass `cls` from a dict, rejecting unknown keys and ill-typed values."""
    where = prefix or "config"
    if not isinstance(raw, dict):
        raise ConfigError(f"'{where}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise ConfigError(f"unknown config key '{key}'; valid keys here: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name in raw:
            key = f"{prefix}.{name}" if prefix else name
            kwargs[name] = _coerce(raw[name], hints[name], key)
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is Any:
        return _freeze(value)
    if origin is Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(repr(c) for c in typing.get_args(tp))
            raise ConfigError(f"config key '{key}' must be one of {choices}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"config key '{key}' has invalid value {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"config key '{key}' must have {len(args)} items, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not -2**63 <= value < 2**63:  # sizes, steps and seeds: JAX takes 64 bits
                raise ConfigError(f"config key '{key}' must fit in 64 bits, got {value}")
            return value
        raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    if tp is float:
        number = None
        # a str too: YAML 1.1 reads '1e-3' as a string
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an int beyond any float
                number = math.inf
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
    raise ConfigError(f"config key '{key}' has unsupported type {tp}")  # a bug, not user input


def _freeze(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _read_yaml(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{what} '{path}' " + ("is a directory; give a YAML file" if
                                                 path.is_dir() else "does not exist"))
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"{what} '{path}' cannot be read ({e.strerror})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        at = f" at line {line + 1}" if line is not None else ""
        raise ConfigError(f"{what} '{path}' is not valid YAML{at}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} '{path}' must hold a mapping of sections, got {type(data).__name__}")
    return data


# Sections that accept a preset name: `model: 60m` reads configs/models/60m.yaml,
# `sparsity: rigl` reads configs/methods/rigl.yaml, `lowrank: sltrain` reads
# configs/lowrank/sltrain.yaml; `{preset: NAME, ...}` adds overrides.
PRESET_DIRS = {"model": "models", "sparsity": "methods", "lowrank": "lowrank"}


def section_preset(section: str, name: str) -> dict[str, Any]:
    """The dict of configs/<dir>/NAME.yaml for `section`, or of a YAML path."""
    folder = CONFIGS_DIR / PRESET_DIRS[section]
    path = Path(name)
    if path.suffix not in (".yaml", ".yml"):
        path = folder / f"{name}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in folder.glob("*.yaml"))
        raise ConfigError(f"{section} preset '{name}' not found; available: "
                          f"{', '.join(available)}")
    preset = _read_yaml(path, f"{section} preset")
    if section == "model":
        preset.setdefault("name", path.stem)
    return preset


def model_preset(name: str) -> dict[str, Any]:
    return section_preset("model", name)


def _expand_presets(raw: dict[str, Any]) -> dict[str, Any]:
    for section in PRESET_DIRS:
        value = raw.get(section)
        if isinstance(value, str):
            raw = {**raw, section: section_preset(section, value)}
        elif isinstance(value, dict) and "preset" in value:
            rest = {k: v for k, v in value.items() if k != "preset"}
            raw = {**raw, section: {**section_preset(section, str(value["preset"])), **rest}}
    return raw


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif isinstance(child, str) and i == 0 and part in PRESET_DIRS:
            child = node[part] = section_preset(part, child)
        elif not isinstance(child, dict):
            raise ConfigError(f"override '{key}': '{'.'.join(parts[:i + 1])}' is not a section")
        node = child
    node[parts[-1]] = value
