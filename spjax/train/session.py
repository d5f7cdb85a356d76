"""A training run's set-up: config resolved against the data, mesh, state (fresh, restored or
warm-started), data iterator, checkpointer, and the train and eval steps compiled ahead of
time. `open_session` builds it; the loop (loop.py) only drives it.

A run directory whose last checkpoint is already at `train.steps` with a summary is complete:
`completed_summary` says so before anything is built, so relaunch scripts, sweep re-runs and
SLURM requeues of a finished run cost seconds and change nothing.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

import jax
import yaml
from jax.sharding import Mesh, NamedSharding

from spjax import parallel
from spjax.checkpoint import Checkpointer
from spjax.config import Config, ModelConfig, OptimizerConfig, from_dict, to_dict
from spjax.data.pipeline import TrainIterator, eval_batches, train_iterator
from spjax.data.prepare import default_dataset, load_meta
from spjax.errors import ConfigError
from spjax.rules import Rules
from spjax.train.determinism import deterministic_config
from spjax.train.memory import format_report, memory_report
from spjax.train.optimizer import lr_schedule
from spjax.train.state import Program, StateLayout, TrainState, init_state, state_layout
from spjax.train.step import make_eval_step, make_train_step
from spjax.train.timing import Clock
from spjax.train.warm_start import init_from


def resolve_config(config: Config) -> tuple[Config, dict[str, Any]]:
    """Fills in what comes from the data: the dataset path and the vocabulary size."""
    data_dir = Path(config.data.path) if config.data.path else default_dataset()
    meta = load_meta(data_dir)
    vocab = config.model.vocab_size or int(meta["vocab_size"])
    if vocab < int(meta["vocab_size"]):
        raise ConfigError(f"model.vocab_size ({vocab}) is smaller than the dataset's vocabulary "
                          f"({meta['vocab_size']}); set model.vocab_size=0 to take it from the data")
    config = dataclasses.replace(
        config, model=dataclasses.replace(config.model, vocab_size=vocab),
        data=dataclasses.replace(config.data, path=str(data_dir)))
    return config, meta


def dry_run(config: Config) -> dict[str, Any]:
    """Builds everything from shapes alone and prints the memory per structure; trains nothing."""
    config, _ = resolve_config(config)
    program = Program.build(config)
    mesh = parallel.make_mesh(config.parallel)
    layout = state_layout(program, mesh, parallel.sharding_rules(config.parallel))
    report = memory_report(program.model_def, layout.abstract)
    print(f"spjax: dry run of {config.model.name} (sparsity {config.sparsity.method}, lowrank "
          f"{config.lowrank.method}), whole train state, before sharding over {mesh.size} "
          f"device(s):\n{format_report(report)}", flush=True)
    return report


def checkpoint_meta(config: Config) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed by this config."""
    return {"model": to_dict(config.model),
            "data": {"seq_len": config.data.seq_len, "batch_size": config.data.batch_size}}


# Keys of the checkpoint meta that a newer config may add at their defaults (see _check_meta).
META_DEFAULTS = {"model": to_dict(ModelConfig())}


def open_checkpointer(config: Config) -> Checkpointer:
    return Checkpointer(Path(config.run_dir) / "checkpoints", config.train.keep_checkpoints)


def completed_summary(config: Config, checkpointer: Checkpointer) -> dict[str, Any] | None:
    """The summary of this run_dir when it already finished `train.steps` under this config;
    None when there is training (or a final summary) left to do. A checkpoint past
    `train.steps` is a ConfigError: lowering the step count cannot undo training."""
    latest = checkpointer.latest_step()
    steps = config.train.steps
    if latest is None or latest < steps:
        return None
    if latest > steps:
        raise ConfigError(f"train.steps={steps}, but {checkpointer.directory} already holds "
                          f"step {latest}; set train.steps >= {latest} to go on, or use a new "
                          f"run_dir")
    summary_path = Path(config.run_dir) / "summary.json"
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError):
        return None  # killed between the last save and the summary: the loop writes it now
    if summary.get("steps") != steps:
        return None
    checkpointer.check_meta(latest, checkpoint_meta(config), META_DEFAULTS)
    return summary


def schedule_change(config: Config, resume_step: int) -> str | None:
    """A resumed run whose train.steps differs from the one it was started with: what happens
    to the learning-rate schedule (it is a function of train.steps: warm-up fraction and
    cosine length), read from the run_dir's previous config.yaml."""
    try:
        previous = yaml.safe_load((Path(config.run_dir) / "config.yaml").read_text())
        old_steps = int(previous["train"]["steps"])
        old_optimizer = from_dict(OptimizerConfig, previous.get("optimizer", {}), "optimizer")
    except Exception:  # no readable previous config: nothing to compare with
        return None
    new_steps = config.train.steps
    if old_steps == new_steps:
        return None
    old_lr = float(lr_schedule(old_optimizer, old_steps)(resume_step))
    new_lr = float(lr_schedule(config.optimizer, new_steps)(resume_step))
    return (f"spjax: train.steps changed from {old_steps} to {new_steps}: resuming at step "
            f"{resume_step} with the learning-rate schedule recomputed for {new_steps} steps "
            f"(warm-up and cosine decay span the new total), so the lr at step {resume_step} "
            f"goes from {old_lr:.3g} to {new_lr:.3g}")


@dataclasses.dataclass
class Session:
    """Everything the loop drives, built once by `open_session`."""

    config: Config
    data_meta: dict[str, Any]
    program: Program
    mesh: Mesh
    rules: Rules
    layout: StateLayout
    batch_sharding: NamedSharding
    data_iter: TrainIterator
    checkpointer: Checkpointer
    resume_step: int | None
    state: TrainState
    train_step: Callable[[TrainState, Any], tuple[TrainState, Any]]
    eval_step: Callable[[TrainState, Any], Any]
    val_batches: list[Any]
    first_batch: Any

    @property
    def is_main(self) -> bool:
        return jax.process_index() == 0

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run_dir)

    def next_batch(self) -> Any:
        return parallel.host_to_global(next(self.data_iter), self.batch_sharding)

    def save(self, state: TrainState, step: int) -> None:
        self.checkpointer.save(step, state, self.data_iter, checkpoint_meta(self.config))


def open_session(config: Config, data_meta: dict[str, Any], checkpointer: Checkpointer,
                 clock: Clock) -> Session:
    """Mesh, program, state and data; then both steps compiled (see `_compile`)."""
    mesh = parallel.make_mesh(config.parallel)
    rules = parallel.sharding_rules(config.parallel)
    shards = parallel.batch_divisor(mesh, rules)
    if config.data.batch_size % shards:
        raise ConfigError(f"data.batch_size ({config.data.batch_size}) must be divisible by the "
                          f"{shards} batch shards of the mesh (parallel.data x fsdp x expert)")
    # deterministic kernels change no parameter, so not the checkpointed config either
    program = Program.build(deterministic_config(config))
    layout = state_layout(program, mesh, rules)
    batch_sharding = parallel.batch_sharding(mesh, rules)
    data_iter = train_iterator(config.data.path, config.data.seq_len, config.data.batch_size,
                               config.data.seed, num_workers=config.data.num_workers)
    resume_step = checkpointer.latest_step()
    if resume_step is not None:
        with clock.part("restore"):
            state = checkpointer.restore(resume_step, layout.abstract, data_iter,
                                         checkpoint_meta(config), META_DEFAULTS)
    else:
        state = init_state(program, layout, config.train.seed)
        if config.train.init_from:
            state = init_from(config.train.init_from, state, program, layout,
                              jax.process_index() == 0)
    val_batches = [parallel.host_to_global(b, batch_sharding) for b in eval_batches(
        config.data.path, config.data.seq_len, config.data.batch_size,
        config.train.eval_batches)]
    first_batch = parallel.host_to_global(next(data_iter), batch_sharding)
    clock.add("startup", time.time() - clock.started - clock.seconds["restore"])
    with clock.part("compile"):
        train_step, eval_step = _compile(program, layout, batch_sharding, state, first_batch,
                                         val_batches[0])
    return Session(config, data_meta, program, mesh, rules, layout, batch_sharding, data_iter,
                   checkpointer, resume_step, state, train_step, eval_step, val_batches,
                   first_batch)


def _compile(program: Program, layout: StateLayout, batch_sharding: NamedSharding,
             state: TrainState, train_batch: Any, eval_batch: Any) -> tuple[Callable, Callable]:
    """The train step (state donated) and the eval step, compiled ahead of time and side by
    side: XLA compiles outside the GIL, so the eval step's compile (about as long as the train
    step's forward) hides behind the train step's instead of stalling the first evaluation."""
    with parallel.activate(layout.mesh, layout.rules):  # model code reads the mesh at trace
        train_lowered = jax.jit(make_train_step(program),
                                in_shardings=(layout.state, batch_sharding),
                                out_shardings=(layout.state, None),
                                donate_argnums=0).lower(state, train_batch)
        eval_lowered = jax.jit(make_eval_step(program),
                               in_shardings=(layout.state, batch_sharding)).lower(state,
                                                                                  eval_batch)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        eval_compiled = pool.submit(eval_lowered.compile)
        train_compiled = train_lowered.compile()
        return train_compiled, eval_compiled.result()
