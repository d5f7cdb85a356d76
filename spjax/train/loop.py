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
    config = session.config
    total_steps = config.train.steps
    tokens_per_step = config.data.batch_size * config.data.seq_len
    peak = flops_lib.peak_flops_per_device()
    peak_total = peak * session.mesh.size if peak else None
    flops_per_token = session.program.accounting.dense_flops_per_token
    attention_flops = flops_lib.attention_flops_per_token(config.model, config.data.seq_len)[0]
    save_every_s = 60 * config.train.checkpoint_every_minutes
    state, batch = session.state, session.first_batch
    session.state = session.first_batch = None  # donated to the first step
    step = int(state.step)
    outcome = LoopOutcome(step, {}, [], [], writer.nonfinite_before)

    def measured_attention(values: dict[str, float]) -> None:
        """Learned gates: attention FLOPs at the density the step measured."""
        if "attn_density" in values:
            outcome.gate_densities.append(values["attn_density"])
            values["attention_flops_per_token"] = flops_lib.attention_flops_per_token(
                config.model, config.data.seq_len, values["attn_density"])[0]

    stop = _StopFlag()
    bar = tqdm(total=total_steps, initial=step, disable=not (session.is_main and
                                                               config.train.progress),
               dynamic_ncols=True, unit="step", file=sys.stderr)
    guard = _NonFiniteGuard(session, writer, bar)
    stopping = False
    pending_log: tuple[int, Any] | None = None
    pending_flag: tuple[int, Any] | None = None
    interval_start, interval_steps = time.time(), 0
    last_save = time.time()
    loop_start = time.time()
    timed_parts = ("train_steps", "eval", "checkpoint")
    timed_before = sum(clock.seconds[p] for p in timed_parts)
    try:
        while step < total_steps:
            state, metrics = session.train_step(state, batch)
            step += 1
            interval_steps += 1
            if pending_flag is not None:  # the previous step's flag; it is done by now
                guard.check(*pending_flag)
            pending_flag = (step, metrics)
            if pending_log is not None:  # the previous logging step's metrics
                outcome.last_metrics = _log(writer, bar, *pending_log, measured_attention)
                pending_log = None
            if _logs(config, step):
                jax.block_until_ready(metrics["loss"])
                elapsed = time.time() - interval_start
                rate = interval_steps * tokens_per_step / elapsed
                outcome.step_times.append(elapsed / interval_steps)
                extra = {"tokens_per_s": rate, "tokens": step * tokens_per_step,
                         "attention_flops_per_token": attention_flops}
                if peak_total:
                    extra["mfu"] = rate * flops_per_token / peak_total
                pending_log = (step, {**metrics, **extra})
                interval_start, interval_steps = time.time(), 0
            if config.train.eval_every and step % config.train.eval_every == 0 \
                    and step < total_steps:
                with clock.part("eval", wait_for=state):
                    val_loss = _evaluate(session, state)
                writer.write(step, {"val_loss": val_loss, "val_ppl": ppl(val_loss)})
                if session.is_main:  # tqdm.write prints even where the bar is disabled
                    bar.write(f"step {step}: val_loss {val_loss:.4f} (ppl {ppl(val_loss):.2f})")
                interval_start = time.time()
            # Saves are collective: with several processes, all must stop at the same step.
            time_due = bool(save_every_s) and time.time() - last_save >= save_every_s
            stopping, time_due = distributed.step_agreed(step, stop.signal is not None,
                                                         time_due)
            if (config.train.checkpoint_every and step % config.train.checkpoint_every == 0) \
                    or step == total_steps or stopping or time_due:
                guard.check(*pending_flag)  # never save past a step that must stop the run
                pending_flag = None
                with clock.part("checkpoint", wait_for=state):
                    session.save(state, step)
                last_save = interval_start = time.time()
            if stopping:
                break
            if step < total_steps:
                batch = session.next_batch()
        if pending_flag is not None:
            guard.check(*pending_flag)
        if pending_log is not None:
            outcome.last_metrics = _log(writer, bar, *pending_log, measured_attention)
    finally:
        bar.close()
        stop.restore()
        with clock.part("checkpoint"):
            session.checkpointer.wait()
        # the loop's time that evaluations and saves did not take (their waits for steps in
        # flight were already counted as training by clock.part)
        clock.add("train_steps", time.time() - loop_start
                  - (sum(clock.seconds[p] for p in timed_parts) - timed_before))
    outcome.step, outcome.skipped_steps = step, guard.skipped
    if stopping and step < total_steps:
        writer.close()
        session.checkpointer.close()
        # A process may stop because another one was signalled.
        raise TrainingInterrupted(stop.signal or signal.SIGTERM, step,
                                  session.checkpointer.directory)
    return state, outcome


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
