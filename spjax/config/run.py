"""The run config's own sections (data, optimizer, train, parallel) and `Config`, the whole
run: every section a frozen dataclass whose `validate()` checks its own values; `Config.validate`
then runs the cross-section checks of checks.py. The model, sparsity and low-rank sections live
in their own modules beside this one; loading.py reads YAML and overrides into these classes.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from spjax.config import checks
from spjax.config.lowrank import LowRankConfig
from spjax.config.model import ModelConfig
from spjax.rules import RuleList
from spjax.config.sparsity import SparsityConfig
from spjax.errors import ConfigError


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
        checks.check(self)
