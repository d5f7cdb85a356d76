"""AdamW with linear warm-up, cosine decay to a fraction of the peak, and global-norm clipping."""

from __future__ import annotations

from typing import Any

import jax
import optax

from spjax.config import OptimizerConfig


def warmup_steps(config: OptimizerConfig, total_steps: int) -> int:
    if config.warmup_steps is not None:
        return min(config.warmup_steps, total_steps)
    return max(1, total_steps // 10)


def lr_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """0 -> peak linearly over the warm-up, then cosine to `min_lr_ratio` x peak at the end."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.lr, warmup_steps=warmup_steps(config, total_steps),
        decay_steps=max(total_steps, warmup_steps(config, total_steps) + 1),
        end_value=config.lr * config.min_lr_ratio)


def decay_mask(params: Any) -> Any:
    """Weight decay on matrices only: never on norm scales (vectors)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def build_optimizer(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    schedule = lr_schedule(config, total_steps)
    adamw = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                        weight_decay=config.weight_decay, mask=decay_mask)
    if config.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw)
    return adamw
