"""The training loop: set-up, resume, steps, logging, evaluation, checkpoints, signals.

All math happens in the pure jitted steps (step.py); this module only orchestrates. Metrics
are fetched one step late (after the next step is dispatched) so the host never stalls the
device, and only on logging steps.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml
from tqdm import tqdm

from spjax import distributed, parallel
from spjax.checkpoint import Checkpointer, flat_paths, restore_matching
from spjax.config import Config, ModelConfig, to_dict
from spjax.data.pipeline import eval_batches, train_iterator
from spjax.data.prepare import default_dataset, load_meta
from spjax.errors import CheckpointError, ConfigError, SpjaxError
from spjax.nested import nest_paths
from spjax.train import flops as flops_lib
from spjax.train.compile_cache import use_compile_cache
from spjax.train.memory import format_report, memory_report
from spjax.train.metrics import MetricsWriter
from spjax.train.state import Program, TrainState, init_state, state_layout
from spjax.train.step import make_eval_step, make_train_step


class TrainingInterrupted(SpjaxError):
    """SIGTERM/SIGINT arrived; a checkpoint was saved and the run can be resumed."""

    def __init__(self, signum: int, step: int, directory: Path):
        self.signum = signum
        super().__init__(f"interrupted by signal {signum} at step {step}; checkpoint saved in "
                         f"{directory}; run the same command again to resume")


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


def train(config: Config) -> dict[str, Any]:
    """Runs (or resumes) training as configured; returns the summary written to summary.json."""
    wall_start = time.time()
    use_compile_cache(config.train.compile_cache)
    config, data_meta = resolve_config(config)
    is_main = jax.process_index() == 0
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    mesh = parallel.make_mesh(config.parallel)
    rules = parallel.sharding_rules(config.parallel)
    shards = parallel.batch_divisor(mesh, rules)
    if config.data.batch_size % shards:
        raise ConfigError(f"data.batch_size ({config.data.batch_size}) must be divisible by the "
                          f"{shards} batch shards of the mesh (parallel.data x fsdp x expert)")
    program = Program.build(config)
    total_steps = config.train.steps
    layout = state_layout(program, mesh, rules)
    batch_sharding = parallel.batch_sharding(mesh, rules)

    data_iter = train_iterator(config.data.path, config.data.seq_len, config.data.batch_size,
                               config.data.seed, num_workers=config.data.num_workers)
    checkpointer = Checkpointer(run_dir / "checkpoints", config.train.keep_checkpoints)
    ckpt_meta = checkpoint_meta(config)
    resume_step = checkpointer.latest_step()
    if resume_step is not None:
        state = checkpointer.restore(resume_step, layout.abstract, data_iter, ckpt_meta,
                                     {"model": to_dict(ModelConfig())})
    else:
        state = init_state(program, layout, config.train.seed)
        if config.train.init_from:
            state = _init_from(config.train.init_from, state, program, layout, is_main)
    start_step = int(state.step)
    if is_main:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))

    with parallel.activate(mesh, rules):
        train_step = jax.jit(make_train_step(program),
                             in_shardings=(layout.state, batch_sharding),
                             out_shardings=(layout.state, None), donate_argnums=0)
        eval_step = jax.jit(make_eval_step(program), in_shardings=(layout.state, batch_sharding))
        val_batches = [parallel.host_to_global(b, batch_sharding) for b in eval_batches(
            config.data.path, config.data.seq_len, config.data.batch_size,
            config.train.eval_batches)]
        first_batch = parallel.host_to_global(next(data_iter), batch_sharding)
        compile_start = time.time()
        train_step = train_step.lower(state, first_batch).compile()
        compile_s = time.time() - compile_start

    tokens_per_step = config.data.batch_size * config.data.seq_len
    # MFU counts the work the hardware does: masks are applied to dense matmuls here, so the
    # dense count. The FLOPs sparse training actually needs are in the accounting metrics.
    flops_per_token = program.accounting.dense_flops_per_token
    peak = flops_lib.peak_flops_per_device()
    peak_total = peak * mesh.size if peak else None
    n_params = program.model_def.param_count()
    attention_flops, dense_attention_flops = flops_lib.attention_flops_per_token(
        config.model, config.data.seq_len)
    gate_densities: list[float] = []  # learned gates: attn_density of each logged step

    def measured_attention(values: dict[str, float]) -> None:
        """Learned gates: attention FLOPs at the density the step measured."""
        if "attn_density" in values:
            gate_densities.append(values["attn_density"])
            values["attention_flops_per_token"] = flops_lib.attention_flops_per_token(
                config.model, config.data.seq_len, values["attn_density"])[0]
    if is_main:
        print(f"spjax: model {config.model.name}: {n_params:,} parameters "
              f"({n_params / 1e6:.2f}M); {flops_per_token / 1e9:.3f} GFLOP/token; "
              f"mesh {dict(mesh.shape)}; {tokens_per_step:,} tokens/step; "
              f"data {config.data.path} (unigram entropy "
              f"{data_meta.get('unigram_entropy_nats', float('nan')):.3f} nats); "
              f"compiled in {compile_s:.1f}s", flush=True)
        if program.sparsity is not None:
            engine = program.sparsity
            kept = sum(layer.kept_weights for layer in engine.layers)
            print(f"spjax: sparsity {config.sparsity.method} ({config.sparsity.pattern}, "
                  f"{config.sparsity.distribution}) on {len(engine.layers)} layers: finally "
                  f"{kept:,} of {engine.masked_size:,} weights kept "
                  f"({kept / engine.masked_size:.1%})", flush=True)
        if resume_step is not None:
            print(f"spjax: resumed from step {resume_step} in {checkpointer.directory}", flush=True)

    writer = MetricsWriter(run_dir, start_step, enabled=is_main)
    stop = _StopFlag()
    bar = tqdm(total=total_steps, initial=start_step, disable=not (is_main and
                                                                     config.train.progress),
               dynamic_ncols=True, unit="step", file=sys.stderr)

    def evaluate(s: TrainState) -> float:
        with parallel.activate(mesh, rules):
            sums = distributed.fetch([eval_step(s, b) for b in val_batches])
        loss_sum = sum(float(m["loss_sum"]) for m in sums)
        return loss_sum / sum(float(m["tokens"]) for m in sums)

    def save(s: TrainState, step: int) -> None:
        checkpointer.save(step, s, data_iter, ckpt_meta)

    last: dict[str, Any] = {}
    stopping = False
    pending: tuple[int, Any] | None = None
    interval_start, interval_steps = time.time(), 0
    step_times: list[float] = []
    batch = first_batch
    step = start_step
    try:
        while step < total_steps:
            state, metrics = train_step(state, batch)
            step += 1
            interval_steps += 1
            if pending is not None:  # fetch the previous logging step's metrics now
                last = _log(writer, bar, *pending, last, measured_attention)
                pending = None
            if step % config.train.log_every == 0 or step == total_steps:
                jax.block_until_ready(metrics["loss"])
                elapsed = time.time() - interval_start
                rate = interval_steps * tokens_per_step / elapsed
                step_times.append(elapsed / interval_steps)
                extra = {"tokens_per_s": rate, "tokens": step * tokens_per_step,
                         "attention_flops_per_token": attention_flops}
                if peak_total:
                    extra["mfu"] = rate * flops_per_token / peak_total
                pending = (step, {**metrics, **extra})
                interval_start, interval_steps = time.time(), 0
            if config.train.eval_every and step % config.train.eval_every == 0 \
                    and step < total_steps:
                val_loss = evaluate(state)
                writer.write(step, {"val_loss": val_loss, "val_ppl": _ppl(val_loss)})
                if is_main:  # tqdm.write prints even where the bar is disabled
                    bar.write(f"step {step}: val_loss {val_loss:.4f} (ppl {_ppl(val_loss):.2f})")
                interval_start = time.time()
            # Saves are collective: with several processes, all must stop at the same step.
            stopping = distributed.stop_agreed(step, stop.signal is not None)
            if (config.train.checkpoint_every and step % config.train.checkpoint_every == 0) \
                    or step == total_steps or stopping:
                save(state, step)
            if stopping:
                break
            if step < total_steps:
                batch = parallel.host_to_global(next(data_iter), batch_sharding)
        if pending is not None:
            last = _log(writer, bar, *pending, last, measured_attention)
    finally:
        bar.close()
        stop.restore()
        checkpointer.wait()

    if stopping and step < total_steps:
        writer.close()
        checkpointer.close()
        # A process may stop because another one was signalled.
        raise TrainingInterrupted(stop.signal or signal.SIGTERM, step, checkpointer.directory)

    val_loss = evaluate(state)
    tokens_seen = step * tokens_per_step
    if gate_densities:  # the learned layers at their mean measured density
        mean_density = float(np.mean(gate_densities))
        attention_flops = flops_lib.attention_flops_per_token(
            config.model, config.data.seq_len, mean_density)[0]
    else:
        mean_density = None
    accounting = distributed.fetch(state.accounting)
    now = distributed.fetch(program.accounting.measure(state.structure))
    summary = {
        "model": config.model.name,
        "params": n_params,
        "steps": step,
        "tokens_seen": tokens_seen,
        "final_train_loss": last.get("loss"),
        "final_val_loss": val_loss,
        "final_val_perplexity": _ppl(val_loss),
        "unigram_entropy_nats": data_meta.get("unigram_entropy_nats"),
        "sparsity_method": config.sparsity.method,
        "nonzero_params": float(now["nonzero_params"]),
        "avg_nonzero_params": float(accounting["avg_nonzero_params"]),
        "dense_flops_per_token": flops_per_token,
        "train_flops": float(accounting["avg_flops_per_token"]) * tokens_seen,
        "dense_train_flops": flops_per_token * tokens_seen,
        "train_flops_vs_dense": float(accounting["avg_flops_per_token"]) / flops_per_token,
        "tokens_per_s": tokens_per_step / float(np.median(step_times)) if step_times else None,
        "wall_time_s": time.time() - wall_start,
        "compile_time_s": compile_s,
        "resumed_from_step": resume_step,
        "devices": mesh.size,
        "device_kind": jax.devices()[0].device_kind,
        "layer_density": program.accounting.layer_densities(state.structure),
        # block-sparse attention: the score and value products the patterns compute
        "attention_flops_per_token": attention_flops,
        "dense_attention_flops_per_token": dense_attention_flops,
        "attention_flops_vs_dense": attention_flops / dense_attention_flops,
        "attention_density": flops_lib.attention_densities(config.model, config.data.seq_len,
                                                           mean_density),
        "memory": memory_report(program.model_def, layout.abstract),
    }
    if peak_total and summary["tokens_per_s"]:
        summary["mfu"] = summary["tokens_per_s"] * flops_per_token / peak_total
    writer.write(step, {"val_loss": val_loss, "val_ppl": _ppl(val_loss)})
    writer.close()
    checkpointer.close()
    if is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"spjax: done: {step} steps, {tokens_seen:,} tokens, train loss "
              f"{summary['final_train_loss']:.4f}, val loss {val_loss:.4f} "
              f"(ppl {_ppl(val_loss):.2f}) in {summary['wall_time_s']:.0f}s; "
              f"summary in {run_dir / 'summary.json'}", flush=True)
    return summary


def _log(writer: MetricsWriter, bar: tqdm, step: int, metrics: dict[str, Any],
         last: dict[str, Any], derive: Any = None) -> dict[str, Any]:
    values = {k: float(v) for k, v in distributed.fetch(metrics).items()}
    if derive is not None:
        derive(values)
    writer.write(step, values)
    postfix = {"loss": f"{values['loss']:.3f}", "tok/s": f"{values['tokens_per_s']:,.0f}"}
    if "mfu" in values:
        postfix["mfu"] = f"{100 * values['mfu']:.1f}%"
    bar.set_postfix(postfix, refresh=False)
    bar.update(step - bar.n)
    return values


def _init_from(source: str, state: TrainState, program: Program, layout: Any, is_main: bool
               ) -> TrainState:
    """train.init_from: the parameters and structure another run's latest checkpoint holds
    (matched by path) replace the fresh ones; the rest (a new gate) keeps its init. Optimizer
    state, step and data start afresh (AdamW's moments are zeros whatever the weights)."""
    fresh = {"params": state.params, "structure": state.structure}
    abstract = {"params": layout.abstract.params, "structure": layout.abstract.structure}
    aliases = _warm_start_aliases(abstract)
    restored, missing, step = restore_matching(source, _with_aliases(abstract, aliases))
    for source_path, path in aliases.items():  # a dense run's kernel becomes ReLoRA's W0
        kernel = restored.pop(source_path, None)  # never counted as a tensor of its own
        if kernel is not None and path not in restored:  # a ReLoRA run's own W0 wins
            restored[path] = kernel
            missing.remove(path)
        if source_path in missing:
            missing.remove(source_path)
    if not any(path.startswith("params/") for path in restored):
        raise CheckpointError(f"train.init_from: the checkpoint in '{source}' holds none of "
                              f"this model's parameters; is it a run of the same model?")
    paths = list(flat_paths(fresh))
    leaves = [restored.get(path, leaf) for path, leaf in zip(paths, jax.tree.leaves(fresh))]
    merged = jax.tree.unflatten(jax.tree.structure(fresh), leaves)
    if is_main:
        fresh_params = [p.removeprefix("params/") for p in missing if p.startswith("params/")]
        print(f"spjax: initialized from {source} (step {step}): {len(restored)} of "
              f"{len(paths)} tensors; freshly initialized: {', '.join(fresh_params) or 'none'}",
              flush=True)
    accounting = jax.device_put(program.accounting.initial_state(merged["structure"]),
                                layout.state.accounting)
    return dataclasses.replace(state, params=merged["params"], structure=merged["structure"],
                               accounting=accounting)


def _warm_start_aliases(abstract: dict[str, Any]) -> dict[str, str]:
    """{'params/<layer>/kernel': 'structure/<layer>/w0'} for every ReLoRA layer: ReLoRA's warm
    start (Lialin et al.) begins from a full-rank run, whose kernel is this run's frozen W0.
    The factors keep their init (B = 0), so the model starts as the dense run's function."""
    aliases = {}
    for path in flat_paths(abstract):
        if path.startswith("structure/") and path.endswith("/w0"):
            layer = path.removeprefix("structure/").removesuffix("/w0")
            aliases[f"params/{layer}/kernel"] = path
    return aliases


def _with_aliases(abstract: dict[str, Any], aliases: dict[str, str]) -> dict[str, Any]:
    """`abstract` as nested plain dicts, plus one entry per alias shaped like its target."""
    leaves = flat_paths(abstract)
    leaves.update({source_path: leaves[path] for source_path, path in aliases.items()})
    return nest_paths(leaves)


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0))
