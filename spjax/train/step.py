"""Pure train and eval steps: `train_step(state, batch) -> (state, metrics)`.

No Python side effects inside; gradients are taken over `state.params` only (never over
masks or other structure), and the caller jits these with explicit shardings and donates the
incoming state.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from spjax.train.state import ModelDef, TrainState

Batch = dict[str, jax.Array]  # {"inputs": int32[B, T], "targets": int32[B, T]}
Metrics = dict[str, jax.Array]


def token_losses(model_def: ModelDef, params: Any, structure: Any, batch: Batch) -> jax.Array:
    """Per-token cross-entropy in fp32, shape [B, T]."""
    logits_BxTxV = model_def.merge(params, structure)(batch["inputs"])
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, batch["targets"])


def make_train_step(model_def: ModelDef, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule) -> Callable[[TrainState, Batch], tuple[TrainState,
                                                                                  Metrics]]:
    def loss_fn(params: Any, structure: Any, batch: Batch) -> jax.Array:
        return jnp.mean(token_losses(model_def, params, structure, batch))

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        loss, grads = jax.value_and_grad(loss_fn)(state.params, state.structure, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                   "lr": schedule(state.step)}
        new_state = TrainState(step=state.step + 1, params=params, structure=state.structure,
                               opt_state=opt_state, rng=state.rng)
        return new_state, metrics

    return train_step


def make_eval_step(model_def: ModelDef) -> Callable[[TrainState, Batch], Metrics]:
    """Summed loss and token count, so batches of any size average exactly."""

    def eval_step(state: TrainState, batch: Batch) -> Metrics:
        losses = token_losses(model_def, state.params, state.structure, batch)
        return {"loss_sum": jnp.sum(losses), "tokens": jnp.asarray(losses.size, jnp.float32)}

    return eval_step
