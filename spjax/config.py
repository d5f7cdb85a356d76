"""Typed run configuration: YAML file + dotted `key=value` overrides, strictly validated.

Every section is a frozen dataclass. `load_config(path, overrides)` reads the YAML, expands
model presets (`model: 60m` or `model: {preset: 60m, vocab_size: 32000}` read
`configs/models/60m.yaml`; likewise `sparsity: rigl` reads `configs/methods/rigl.yaml`),
applies overrides in order, and builds the dataclasses. Unknown
keys, ill-typed values and out-of-range values raise `ConfigError` naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from spjax.errors import ConfigError, not_a_directory
from spjax.lowrank.config import LowRankConfig
from spjax.model import attention_patterns
from spjax.rules import Rules
from spjax.sparsity.config import SparsityConfig

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"

from spjax.model_config import (  # noqa: F401  (re-exported: the model section lives there)
    LEARNED, AttentionGateConfig, AttentionPatternConfig, ModelConfig, MoEConfig, RuleList)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    path: str = ""  # prepared dataset dir (`spjax prepare-data`); "" = built-in stdlib source
    seq_len: int = 256
    batch_size: int = 32  # global, in sequences
    seed: int = 0  # shuffling seed
    num_workers: int = 0  # grain worker processes; 0 = in the training process

    def validate(self) -> None:
        if self.seq_len <= 0:
            raise ConfigError(f"data.seq_len must be > 0, got {self.seq_len}")
        if self.batch_size <= 0:
            raise ConfigError(f"data.batch_size must be > 0, got {self.batch_size}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    name: Literal["adamw"] = "adamw"
    lr: float = 3e-3
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # applied to matrices only, never to norms
    grad_clip: float = 1.0  # global-norm clipping; 0 disables
    warmup_steps: int | None = None  # None: 10% of train.steps
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of the peak

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optimizer.lr must be > 0, got {self.lr}")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
            raise ConfigError("optimizer.b1 and optimizer.b2 must lie in [0, 1)")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ConfigError("optimizer.grad_clip and optimizer.weight_decay must be >= 0")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(f"optimizer.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optimizer.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    seed: int = 0  # parameter init and dropout-free step RNG
    log_every: int = 10
    eval_every: int = 200  # 0 disables periodic evaluation (the final one still runs)
    eval_batches: int = 8
    checkpoint_every: int = 500  # 0 disables periodic checkpoints (the final one still runs)
    keep_checkpoints: int = 3
    progress: bool = True  # progress bar on stderr
    # JAX's persistent compilation cache: a directory, 'auto' (~/.cache/spjax/jax on GPUs,
    # off on CPU, where compiles are short) or '' (off). A resumed or repeated run then loads
    # its compiled step instead of compiling it again (minutes for Mosaic-kernel models).
    compile_cache: str = "auto"
    # A run directory (or its checkpoints/ folder) whose latest checkpoint gives the initial
    # parameters and structure, matched by path; what it lacks (a new gate) keeps its fresh
    # init. Optimizer, step and data start afresh. Ignored when this run_dir can resume.
    init_from: str = ""
    # 'gate': train only the attention gates (layers/*/attn/gate), every other parameter
    # frozen bit-exactly: sparsify a trained dense checkpoint by distillation
    trainable: Literal["all", "gate"] = "all"
    # A save every this many minutes as well (0: off), e.g. to bound the work a pre-empted
    # job loses; saves stay collective and atomic
    checkpoint_every_minutes: float = 0.0
    # A NaN/Inf loss or gradient norm never changes the state. 'stop': the run ends with an
    # error naming the step and the last good checkpoint; 'skip': the step's update is
    # dropped (logged as nonfinite in metrics.jsonl) and training goes on, until
    # nan_skip_limit steps in a row were skipped
    nan_policy: Literal["stop", "skip"] = "stop"
    nan_skip_limit: int = 10
    # Bit-identical runs on one GPU (XLA's deterministic ops; see train/determinism.py).
    # CPU runs are deterministic either way
    deterministic: bool = False

    def validate(self) -> None:
        if self.steps <= 0:
            raise ConfigError(f"train.steps must be > 0, got {self.steps}")
        if self.nan_skip_limit <= 0:
            raise ConfigError(f"train.nan_skip_limit must be > 0, got {self.nan_skip_limit}")
        if self.checkpoint_every_minutes < 0:
            raise ConfigError(f"train.checkpoint_every_minutes must be >= 0 (0: off), got "
                              f"{self.checkpoint_every_minutes}")
        for key in ("log_every", "eval_batches", "keep_checkpoints"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"train.{key} must be > 0, got {getattr(self, key)}")
        for key in ("eval_every", "checkpoint_every"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key} must be >= 0, got {getattr(self, key)}")


# Logical axis -> mesh axis (None: replicated). First matching regex wins. Mesh axes of
# size 1 are dropped, so these rules serve every mesh shape.
DEFAULT_SHARDING_RULES: RuleList = (
    ("batch", ("data", "fsdp", "expert")),  # tokens: every data-like axis (EP reuses DP ranks)
    ("embed", "fsdp"),  # FSDP: every matrix is split along its model dimension
    ("(heads|mlp|vocab)", "tensor"),  # tensor parallelism: Megatron-style column/row splits
    ("experts", "expert"),  # expert parallelism: each expert lives on one expert shard
    (".*", None),
)


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    data: int = -1  # -1: all devices not used by the other axes
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1
    rules: RuleList = DEFAULT_SHARDING_RULES

    def validate(self) -> None:
        if self.data == 0 or self.data < -1:
            raise ConfigError(f"parallel.data must be >= 1 or -1 (fill), got {self.data}")
        for key in ("fsdp", "tensor", "expert"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"parallel.{key} must be >= 1, got {getattr(self, key)}")


@dataclasses.dataclass(frozen=True)
class Config:
    run_dir: str = "runs/default"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    train: TrainConfig = TrainConfig()
    parallel: ParallelConfig = ParallelConfig()
    sparsity: SparsityConfig = SparsityConfig()
    lowrank: LowRankConfig = LowRankConfig()

    def validate(self) -> None:
        for section in (self.model, self.data, self.optimizer, self.train, self.parallel,
                        self.sparsity, self.lowrank):
            section.validate()
        experts = self.model.moe.num_experts
        if experts and experts % self.parallel.expert:
            raise ConfigError(f"model.moe.num_experts ({experts}) must be divisible by "
                              f"parallel.expert ({self.parallel.expert})")
        if self.model.moe.capacity_factor > 0 and self.parallel.expert > 1:
            raise ConfigError("model.moe.capacity_factor routes per data shard; with "
                              "parallel.expert > 1 use dropless routing (capacity_factor=0)")
        if self.parallel.expert > 1 and not experts:
            raise ConfigError("parallel.expert > 1 needs a mixture-of-experts model "
                              "(model.moe.num_experts > 0)")
        problem = not_a_directory(self.run_dir)
        if problem:
            raise ConfigError(f"run_dir '{self.run_dir}' cannot be a directory ({problem}); "
                              f"set run_dir to a new or existing directory")
        self._validate_attention_patterns()
        self._validate_block_kernel()
        self._validate_gate_training()
        self._validate_head_sharding()
        if self.lowrank.method == "galore" and self.sparsity.enabled:
            raise ConfigError("lowrank.method 'galore' projects dense gradients and cannot be "
                              "combined with sparsity.method; use one of them")

    def _validate_block_kernel(self) -> None:
        """The Mosaic GPU block-sparse kernels' limits (wgmma: 16-bit operands, 64-wide
        swizzled chunks), at start-up instead of as a traceback inside the first step."""
        section, kernel = self.sparsity, self.sparsity.kernel
        if not (section.enabled and section.pattern == "block" and kernel.startswith("mosaic")):
            return
        if section.block not in (64, 128):
            raise ConfigError(f"sparsity.kernel={kernel} (Mosaic GPU) takes blocks of 64 or 128, "
                              f"got sparsity.block={section.block}; set sparsity.block=128 or "
                              f"sparsity.kernel=pallas")
        if self.model.compute_dtype != "bfloat16":
            raise ConfigError(f"sparsity.kernel={kernel} (Mosaic GPU) multiplies in bfloat16, "
                              f"got model.compute_dtype={self.model.compute_dtype}; set "
                              f"model.compute_dtype=bfloat16 or sparsity.kernel=pallas")

    def _validate_gate_training(self) -> None:
        if self.train.trainable != "gate":
            return
        if not self.model.attention_pattern.learned_layers(self.model.n_layers):
            raise ConfigError("train.trainable=gate trains only attention gates, but no layer "
                              "is 'learned'; set model.attention_pattern.rules, e.g. "
                              "'[[\".*\", learned]]'")
        if self.sparsity.enabled or self.lowrank.method != "none":
            raise ConfigError("train.trainable=gate freezes the model's weights; it cannot be "
                              "combined with sparsity.method or lowrank.method (set them to "
                              "none)")

    def _validate_head_sharding(self) -> None:
        """Grouped key/value heads split over `tensor` (logical axis 'heads') must be whole
        heads per shard: the query heads of a shard must find their key/value heads on it.
        (Without grouping q, k and v split alike, as they always have.)"""
        model, tensor = self.model, self.parallel.tensor
        target = Rules.from_pairs(self.parallel.rules, source="parallel.rules").lookup(
            "heads", None)
        if tensor <= 1 or "tensor" not in ((target,) if isinstance(target, str)
                                           else tuple(target or ())):
            return
        if model.kv_heads < model.q_heads and model.kv_heads % tensor:
            raise ConfigError(f"model.n_kv_heads ({model.n_kv_heads}) must be divisible by "
                              f"parallel.tensor ({tensor}), which splits the heads; use a "
                              f"multiple of {tensor} key/value heads or a smaller parallel.tensor")

    def _validate_attention_patterns(self) -> None:
        """Each pattern in use must fit data.seq_len (window shorter than the sequence...)."""
        section = self.model.attention_pattern
        kinds = set(section.patterns(self.model.n_layers).values())
        if LEARNED in kinds and self.data.seq_len % section.block:
            raise ConfigError(f"model.attention_pattern.block ({section.block}) must divide "
                              f"data.seq_len ({self.data.seq_len}) for the learned gate; pick "
                              f"a block dividing the sequence length")
        for kind in sorted(kinds - {"dense", LEARNED}):
            try:
                attention_patterns.build(
                    kind, seq_len=self.data.seq_len, block=section.block, window=section.window,
                    global_tokens=section.global_tokens, stride=section.stride,
                    dilation=section.dilation, path=section.path, heads=self.model.q_heads)
            except ConfigError as e:
                raise ConfigError(f"model.attention_pattern (data.seq_len {self.data.seq_len}):"
                                  f" {e}") from None


# ----------------------------------------------------------------------------- loading


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
