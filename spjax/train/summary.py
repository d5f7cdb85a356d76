"""summary.json: what a finished run reports (losses, tokens, accounting, speed, time)."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import jax
import numpy as np

from spjax import distributed
from spjax.train import accounting as flops_lib
from spjax.train.memory import memory_report
from spjax.train.session import Session
from spjax.train.state import TrainState


@dataclasses.dataclass
class LoopOutcome:
    """What the loop measured, for the summary."""

    step: int
    last_metrics: dict[str, Any]  # the last logged step's values ({} when no step ran)
    step_times: list[float]  # seconds per step, one per logging interval
    gate_densities: list[float]  # learned gates: attn_density of each logged step
    skipped_steps: int  # steps whose update was dropped for a non-finite loss (whole run)


def ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def build_summary(session: Session, state: TrainState, outcome: LoopOutcome, val_loss: float
                  ) -> dict[str, Any]:
    config, program = session.config, session.program
    tokens_per_step = config.data.batch_size * config.data.seq_len
    flops_per_token = program.accounting.dense_flops_per_token
    tokens_seen = outcome.step * tokens_per_step
    attention_flops, dense_attention_flops = flops_lib.attention_flops_per_token(
        config.model, config.data.seq_len)
    mean_density = None
    if outcome.gate_densities:  # the learned layers at their mean measured density
        mean_density = float(np.mean(outcome.gate_densities))
        attention_flops = flops_lib.attention_flops_per_token(
            config.model, config.data.seq_len, mean_density)[0]
    accounting = distributed.fetch(state.accounting)
    now = distributed.fetch(program.accounting.measure(state.structure))
    step_times = outcome.step_times
    summary = {
        "model": config.model.name,
        "params": program.model_def.param_count(),
        "steps": outcome.step,
        "tokens_seen": tokens_seen,
        "final_train_loss": outcome.last_metrics.get("loss"),
        "final_val_loss": val_loss,
        "final_val_perplexity": ppl(val_loss),
        "unigram_entropy_nats": session.data_meta.get("unigram_entropy_nats"),
        "sparsity_method": config.sparsity.method,
        "nonzero_params": float(now["nonzero_params"]),
        "avg_nonzero_params": float(accounting["avg_nonzero_params"]),
        "dense_flops_per_token": flops_per_token,
        "train_flops": float(accounting["avg_flops_per_token"]) * tokens_seen,
        "dense_train_flops": flops_per_token * tokens_seen,
        "train_flops_vs_dense": float(accounting["avg_flops_per_token"]) / flops_per_token,
        "tokens_per_s": tokens_per_step / float(np.median(step_times)) if step_times else None,
        "skipped_nonfinite_steps": outcome.skipped_steps,
        "resumed_from_step": session.resume_step,
        "devices": session.mesh.size,
        "device_kind": jax.devices()[0].device_kind,
        "layer_density": program.accounting.layer_densities(state.structure),
        # block-sparse attention: the score and value products the patterns compute
        "attention_flops_per_token": attention_flops,
        "dense_attention_flops_per_token": dense_attention_flops,
        "attention_flops_vs_dense": attention_flops / dense_attention_flops,
        "attention_density": flops_lib.attention_densities(config.model, config.data.seq_len,
                                                           mean_density),
        "memory": memory_report(program.model_def, session.layout.abstract),
    }
    peak = flops_lib.peak_flops_per_device()
    if peak and summary["tokens_per_s"]:
        summary["mfu"] = summary["tokens_per_s"] * flops_per_token / (peak * session.mesh.size)
    return summary


def write_summary(session: Session, summary: dict[str, Any]) -> None:
    path = session.run_dir / "summary.json"
    print(f"spjax: done: {summary['steps']} steps, {summary['tokens_seen']:,} tokens, train "
          f"loss {_format(summary['final_train_loss'])}, val loss "
          f"{summary['final_val_loss']:.4f} (ppl {summary['final_val_perplexity']:.2f}) in "
          f"{summary['wall_time_s']:.0f}s; summary in {path}", flush=True)
    tmp = path.with_suffix(".json.tmp")  # atomic: a kill never leaves half a summary
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(path)


def _format(value: float | None) -> str:
    return "n/a (no step ran)" if value is None else f"{value:.4f}"
