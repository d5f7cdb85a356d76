"""The training loop: steps, logging, evaluation, checkpoints, signals, non-finite steps.

All math happens in the pure jitted steps (step.py) and all set-up in session.py; this
module only drives them. Metrics are fetched one step late (after the next step is
dispatched) so the host never stalls the device: the loss on logging steps, and every step's
`nonfinite` flag (one scalar).
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import yaml
from tqdm import tqdm

from spjax import distributed
from spjax.config import Config, to_dict
from spjax.errors import SpjaxError
from spjax.train import determinism
from spjax.train import accounting as flops_lib
from spjax.train.compile_cache import use_compile_cache
from spjax.train.metrics import MetricsWriter
from spjax.train.session import (Session, checkpoint_meta, completed_summary,  # noqa: F401
                                 dry_run, open_checkpointer, open_session, resolve_config,
                                 schedule_change)
from spjax.train.state import TrainState
from spjax.train.summary import LoopOutcome, build_summary, ppl, write_summary
from spjax.train.timing import Clock


class TrainingInterrupted(SpjaxError):
    """SIGTERM/SIGINT arrived; a checkpoint was saved and the run can be resumed."""

    def __init__(self, signum: int, step: int, directory: Path):
        self.signum = signum
        super().__init__(f"interrupted by signal {signum} at step {step}; checkpoint saved in "
                         f"{directory}; run the same command again to resume")


class NonFiniteError(SpjaxError):
    """The loss or gradient norm was NaN/Inf (train.nan_policy): the run stopped unsaved."""


class _StopFlag:
    """Turns SIGTERM/SIGINT into a flag checked between steps (a save then follows)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM,
                                                                       signal.SIGINT)}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:  # second signal: give up immediately
            signal.signal(signum, self._previous[signum])
            raise KeyboardInterrupt
        self.signal = signum

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def train(config: Config, started: float | None = None) -> dict[str, Any]:
    """Runs (or resumes) training as configured; returns the summary written to summary.json.
    `started`: when the process started (the CLI's clock), for the start-up time."""
    clock = Clock(started)
    determinism.configure(config.train.deterministic)  # before anything starts the backend
    use_compile_cache(config.train.compile_cache)
    determinism.check_backend(config.train.deterministic, jax.default_backend())
    config, data_meta = resolve_config(config)
    is_main = jax.process_index() == 0
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpointer = open_checkpointer(config)
    finished = completed_summary(config, checkpointer)
    if finished is not None:
        checkpointer.close()
        if is_main:
            print(f"spjax: {run_dir} is already complete at step {finished['steps']} "
                  f"(train.steps={config.train.steps}); summary.json is unchanged. Raise "
                  f"train.steps to train further.", flush=True)
        return finished
    latest = checkpointer.latest_step()
    change = schedule_change(config, latest) if latest is not None and is_main else None
    session = open_session(config, data_meta, checkpointer, clock)
    if is_main:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
        _announce(session, clock.seconds["compile"], change)
    writer = MetricsWriter(run_dir, int(session.state.step), enabled=is_main)
    state, outcome = _run_steps(session, writer, clock)
    with clock.part("eval", wait_for=state):
        val_loss = _evaluate(session, state)
    with clock.part("summary"):
        summary = build_summary(session, state, outcome, val_loss)
    writer.write(outcome.step, {"val_loss": val_loss, "val_ppl": ppl(val_loss)})
    writer.close()
    checkpointer.close()
    summary.update(wall_time_s=time.time() - clock.started,
                   compile_time_s=clock.seconds["compile"], time_s=clock.breakdown())
    if is_main:
        write_summary(session, summary)
    return summary


def _announce(session: Session, compile_s: float, schedule_note: str | None) -> None:
    config, program = session.config, session.program
    n_params = program.model_def.param_count()
    print(f"spjax: model {config.model.name}: {n_params:,} parameters "
          f"({n_params / 1e6:.2f}M); "
          f"{program.accounting.dense_flops_per_token / 1e9:.3f} GFLOP/token; "
          f"mesh {dict(session.mesh.shape)}; "
          f"{config.data.batch_size * config.data.seq_len:,} tokens/step; "
          f"data {config.data.path} (unigram entropy "
          f"{session.data_meta.get('unigram_entropy_nats', float('nan')):.3f} nats); "
          f"compiled in {compile_s:.1f}s", flush=True)
    if program.sparsity is not None:
        engine = program.sparsity
        kept = sum(layer.kept_weights for layer in engine.layers)
        print(f"spjax: sparsity {config.sparsity.method} ({config.sparsity.pattern}, "
              f"{config.sparsity.distribution}) on {len(engine.layers)} layers: finally "
              f"{kept:,} of {engine.masked_size:,} weights kept "
              f"({kept / engine.masked_size:.1%})", flush=True)
    if session.resume_step is not None:
        print(f"spjax: resumed from step {session.resume_step} in "
              f"{session.checkpointer.directory}", flush=True)
    if schedule_note:
        print(schedule_note, flush=True)


def _evaluate(session: Session, state: TrainState) -> float:
    sums = distributed.fetch([session.eval_step(state, b) for b in session.val_batches])
    loss_sum = sum(float(m["loss_sum"]) for m in sums)
    return loss_sum / sum(float(m["tokens"]) for m in sums)


class _NonFiniteGuard:
    """Reads each step's `nonfinite` flag (the step itself already kept the state as it was)
    and applies train.nan_policy: 'stop' ends the run at once; 'skip' logs the step and goes
    on, unless `nan_skip_limit` steps in a row were skipped."""

    def __init__(self, session: Session, writer: MetricsWriter, bar: tqdm):
        self.session, self.writer, self.bar = session, writer, bar
        self.policy = session.config.train.nan_policy
        self.limit = session.config.train.nan_skip_limit
        self.in_a_row = 0
        self.skipped = writer.nonfinite_before

    def check(self, step: int, metrics: dict[str, Any]) -> None:
        if not bool(distributed.to_host(metrics["nonfinite"])):
            self.in_a_row = 0
            return
        values = {k: float(distributed.to_host(metrics[k])) for k in ("loss", "grad_norm")}
        what = f"loss {values['loss']} and gradient norm {values['grad_norm']}"
        if self.policy == "stop":
            self._fail(f"step {step}: non-finite {what}; the run stopped and saved nothing "
                       f"after it")
        self.in_a_row += 1
        self.skipped += 1
        if not _logs(self.session.config, step):  # a logging step's record says it itself
            self.writer.write(step, {**values, "nonfinite": 1})
        if self.session.is_main:
            self.bar.write(f"step {step}: non-finite {what}: update skipped ({self.in_a_row} "
                           f"in a row; the run stops at {self.limit})")
        if self.in_a_row >= self.limit:
            self._fail(f"steps {step - self.limit + 1}-{step}: {self.limit} non-finite steps in "
                       f"a row (train.nan_skip_limit); the last one had {what}")

    def _fail(self, what: str) -> None:
        checkpointer = self.session.checkpointer
        checkpointer.wait()
        latest = checkpointer.latest_step()
        where = (f"the last good checkpoint is step {latest} in {checkpointer.directory}"
                 if latest is not None else "no checkpoint was written")
        fix = ("lower optimizer.lr or raise optimizer.warmup_steps, or set train.nan_policy=skip"
               if self.policy == "stop" else "lower optimizer.lr or check the data")
        raise NonFiniteError(f"{what}; {where}; {fix}")


def _run_steps(session: Session, writer: MetricsWriter, clock: Clock
               ) -> tuple[TrainState, LoopOutcome]:
    """Trains from the session's state to train.steps (or a stop signal, or a non-finite
    step under train.nan_policy); returns the final state and what the loop measured."""
    loop = _StepLoop(session, writer, clock)
    timed_parts = ("train_steps", "eval", "checkpoint")
    timed_before = sum(clock.seconds[p] for p in timed_parts)
    loop_start = time.time()
    try:
        while loop.step < session.config.train.steps and not loop.stopping:
            loop.run_one()
        loop.flush()
    finally:
        loop.close()
        # the loop's time that evaluations and saves did not take (their waits for steps in
        # flight were already counted as training by clock.part)
        clock.add("train_steps", time.time() - loop_start
                  - (sum(clock.seconds[p] for p in timed_parts) - timed_before))
    outcome = loop.outcome
    outcome.step, outcome.skipped_steps = loop.step, loop.guard.skipped
    if loop.stopping and loop.step < session.config.train.steps:
        writer.close()
        session.checkpointer.close()
        # A process may stop because another one was signalled.
        raise TrainingInterrupted(loop.stop.signal or signal.SIGTERM, loop.step,
                                  session.checkpointer.directory)
    return loop.state, outcome


class _StepLoop:
    """One pass over the training steps: each `run_one` dispatches a step, then does what is
    due after it (the previous step's checks and log line, evaluation, a save)."""

    def __init__(self, session: Session, writer: MetricsWriter, clock: Clock):
        config = session.config
        self.session, self.writer, self.clock, self.config = session, writer, clock, config
        self.tokens_per_step = config.data.batch_size * config.data.seq_len
        peak = flops_lib.peak_flops_per_device()
        self.peak_total = peak * session.mesh.size if peak else None
        self.attention_flops = flops_lib.attention_flops_per_token(config.model,
                                                                   config.data.seq_len)[0]
        self.state, self.batch = session.state, session.first_batch
        session.state = session.first_batch = None  # donated to the first step
        self.step = int(self.state.step)
        self.outcome = LoopOutcome(self.step, {}, [], [], writer.nonfinite_before)
        self.stop = _StopFlag()
        self.bar = tqdm(total=config.train.steps, initial=self.step,
                        disable=not (session.is_main and config.train.progress),
                        dynamic_ncols=True, unit="step", file=sys.stderr)
        self.guard = _NonFiniteGuard(session, writer, self.bar)
        self.stopping = False
        self.pending_log: tuple[int, Any] | None = None  # logged one step late
        self.pending_flag: tuple[int, Any] | None = None  # checked one step late
        self.interval_start, self.interval_steps = time.time(), 0
        self.last_save = time.time()

    def run_one(self) -> None:
        self.state, metrics = self.session.train_step(self.state, self.batch)
        self.step += 1
        self.interval_steps += 1
        if self.pending_flag is not None:  # the previous step's flag; it is done by now
            self.guard.check(*self.pending_flag)
        self.pending_flag = (self.step, metrics)
        self.flush_log()
        if _logs(self.config, self.step):
            self._measure_interval(metrics)
        train = self.config.train
        if train.eval_every and self.step % train.eval_every == 0 and self.step < train.steps:
            self._evaluate()
        self._maybe_save()
        if self.step < train.steps and not self.stopping:
            self.batch = self.session.next_batch()

    def _measure_interval(self, metrics: dict[str, Any]) -> None:
        jax.block_until_ready(metrics["loss"])
        elapsed = time.time() - self.interval_start
        rate = self.interval_steps * self.tokens_per_step / elapsed
        self.outcome.step_times.append(elapsed / self.interval_steps)
        extra = {"tokens_per_s": rate, "tokens": self.step * self.tokens_per_step,
                 "attention_flops_per_token": self.attention_flops}
        if self.peak_total:
            extra["mfu"] = (rate * self.session.program.accounting.dense_flops_per_token
                            / self.peak_total)
        self.pending_log = (self.step, {**metrics, **extra})
        self.interval_start, self.interval_steps = time.time(), 0

    def _evaluate(self) -> None:
        with self.clock.part("eval", wait_for=self.state):
            val_loss = _evaluate(self.session, self.state)
        self.writer.write(self.step, {"val_loss": val_loss, "val_ppl": ppl(val_loss)})
        if self.session.is_main:  # tqdm.write prints even where the bar is disabled
            self.bar.write(f"step {self.step}: val_loss {val_loss:.4f} "
                           f"(ppl {ppl(val_loss):.2f})")
        self.interval_start = time.time()

    def _maybe_save(self) -> None:
        train = self.config.train
        save_every_s = 60 * train.checkpoint_every_minutes
        time_due = bool(save_every_s) and time.time() - self.last_save >= save_every_s
        # Saves are collective: with several processes, all must stop at the same step.
        self.stopping, time_due = distributed.step_agreed(self.step,
                                                          self.stop.signal is not None, time_due)
        if (train.checkpoint_every and self.step % train.checkpoint_every == 0) \
                or self.step == train.steps or self.stopping or time_due:
            self.guard.check(*self.pending_flag)  # never save past a step that must stop
            self.pending_flag = None
            with self.clock.part("checkpoint", wait_for=self.state):
                self.session.save(self.state, self.step)
            self.last_save = self.interval_start = time.time()

    def flush_log(self) -> None:
        if self.pending_log is not None:
            self.outcome.last_metrics = _log(self.writer, self.bar, *self.pending_log,
                                             self._measured_attention)
            self.pending_log = None

    def flush(self) -> None:
        """After the last step: its flag and its log line."""
        if self.pending_flag is not None:
            self.guard.check(*self.pending_flag)
        self.flush_log()

    def close(self) -> None:
        self.bar.close()
        self.stop.restore()
        with self.clock.part("checkpoint"):
            self.session.checkpointer.wait()

    def _measured_attention(self, values: dict[str, float]) -> None:
        """Learned gates: attention FLOPs at the density the step measured."""
        if "attn_density" in values:
            self.outcome.gate_densities.append(values["attn_density"])
            values["attention_flops_per_token"] = flops_lib.attention_flops_per_token(
                self.config.model, self.config.data.seq_len, values["attn_density"])[0]


def _logs(config: Config, step: int) -> bool:
    return step % config.train.log_every == 0 or step == config.train.steps


def _log(writer: MetricsWriter, bar: tqdm, step: int, metrics: dict[str, Any],
         derive: Any = None) -> dict[str, Any]:
    values = {k: float(v) for k, v in distributed.fetch(metrics).items()}
    if not values["nonfinite"]:  # present only on the steps whose update was dropped
        del values["nonfinite"]
    if derive is not None:
        derive(values)
    writer.write(step, values)
    postfix = {"loss": f"{values['loss']:.3f}", "tok/s": f"{values['tokens_per_s']:,.0f}"}
    if "mfu" in values:
        postfix["mfu"] = f"{100 * values['mfu']:.1f}%"
    bar.set_postfix(postfix, refresh=False)
    bar.update(step - bar.n)
    return values
