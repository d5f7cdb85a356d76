"""AdamW with linear warm-up, cosine decay to a fraction of the peak, and global-norm clipping;
`train_only`, which freezes all but chosen parameters; and `zero_moments`, which resets chosen
entries of any optax state."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import optax

from spjax.config import OptimizerConfig


def warmup_steps(config: OptimizerConfig, total_steps: int) -> int:
    if config.warmup_steps is not None:
        return min(config.warmup_steps, total_steps)
    return max(1, total_steps // 10)


def lr_schedule(config: OptimizerConfig, total_steps: int,
                factor: Callable[[jax.Array], jax.Array] | None = None) -> optax.Schedule:
    """0 -> peak linearly over the warm-up, then cosine to `min_lr_ratio` x peak at the end;
    times `factor(count)` when given (the jagged re-warm-ups of ReLoRA and refactorization)."""
    base = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.lr, warmup_steps=warmup_steps(config, total_steps),
        decay_steps=max(total_steps, warmup_steps(config, total_steps) + 1),
        end_value=config.lr * config.min_lr_ratio)
    if factor is None:
        return base
    return lambda count: base(count) * factor(count)


@dataclasses.dataclass(frozen=True)
class GaLoreSettings:
    rank: int
    update_every: int
    scale: float
    is_target: Callable[[tuple, jax.Array], bool]


def decay_mask(params: Any) -> Any:
    """Weight decay on matrices only: never on norm scales (vectors)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def build_optimizer(config: OptimizerConfig, total_steps: int,
                    lr_factor: Callable[[jax.Array], jax.Array] | None = None,
                    galore: GaLoreSettings | None = None) -> optax.GradientTransformation:
    """AdamW (or GaLore-projected Adam on its target matrices), decoupled weight decay,
    the schedule, and clipping first."""
    schedule = lr_schedule(config, total_steps, lr_factor)
    if galore is None:
        adamw = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                            weight_decay=config.weight_decay, mask=decay_mask)
    else:
        from spjax.lowrank.galore import scale_by_galore

        adamw = optax.chain(
            scale_by_galore(galore.rank, galore.update_every, galore.scale, b1=config.b1,
                            b2=config.b2, eps=config.eps, is_target=galore.is_target),
            optax.add_decayed_weights(config.weight_decay, decay_mask),
            optax.scale_by_learning_rate(schedule))
    if config.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw)
    return adamw


def train_only(optimizer: optax.GradientTransformation,
               is_trainable: Callable[[tuple], bool]) -> optax.GradientTransformation:
    """`optimizer` on the parameters whose path `is_trainable`; zero updates (no weight
    decay, no moments) for the rest, so they stay bit-exact. Clipping inside `optimizer`
    sees only the trained gradients."""

    def labels(params: Any) -> Any:
        return jax.tree.map_with_path(
            lambda path, _: "train" if is_trainable(path) else "frozen", params)

    return optax.multi_transform({"train": optimizer, "frozen": optax.set_to_zero()}, labels)
