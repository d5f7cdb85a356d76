"""Pure train and eval steps: `train_step(state, batch) -> (state, metrics)`.

No Python side effects inside; gradients are taken over `state.params` only (never over
masks or other structure), and the caller jits these with explicit shardings and donates the
incoming state. With a sparsity method, one step is:

  forward/backward with the current masks (straight-through: dense gradient)
  -> the method's optimizer gradients (masked, or dense plus decay terms)
  -> optimizer update
  -> the method's mask update when due (prune/regrow, moments of changed weights zeroed)
  -> kept only if the loss and gradient norm are finite (else the state stays as it was)

Learned attention gates add their distillation loss (model.attention_pattern.gate.loss_coef
x attn_gate_loss) to the loss. With train.trainable=gate every other parameter enters the
loss under stop_gradient (so XLA drops the model's backward) and the optimizer leaves it
untouched (optimizer.train_only).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from spjax.model.attention_gate import is_gate_param
from spjax.train.state import ModelDef, Program, TrainState

Batch = dict[str, jax.Array]  # {"inputs": int32[B, T], "targets": int32[B, T]}
Metrics = dict[str, jax.Array]


def token_losses(model_def: ModelDef, params: Any, structure: Any, batch: Batch,
                 step: jax.Array | None = None) -> jax.Array:
    """Per-token cross-entropy in fp32, shape [B, T]."""
    return losses_and_aux(model_def, params, structure, batch, step)[0]


def losses_and_aux(model_def: ModelDef, params: Any, structure: Any, batch: Batch,
                   step: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(per-token cross-entropy [B, T], the model's aux terms: MoE router losses, attention
    gate terms, or {})."""
    logits_BxTxV, aux = model_def.merge(params, structure).forward(batch["inputs"], step)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, batch["targets"])
    return ce, aux


def make_train_step(program: Program) -> Callable[[TrainState, Batch], tuple[TrainState,
                                                                              Metrics]]:
    model_def, accounting = program.model_def, program.accounting
    sparsity, lowrank = program.sparsity, program.lowrank
    engines = [e for e in (sparsity, lowrank) if e is not None]

    moe = model_def.config.moe
    gate_coef = model_def.config.attention_pattern.gate.loss_coef

    def loss_fn(params: Any, structure: Any, batch: Batch, step: jax.Array):
        if program.trainable == "gate":  # frozen weights: no gradient, no backward pass
            params = jax.tree.map_with_path(
                lambda path, p: p if is_gate_param(path) else jax.lax.stop_gradient(p), params)
        ce, aux = losses_and_aux(model_def, params, structure, batch, step)
        ce = jnp.mean(ce)
        total = ce
        if "moe_load_balance" in aux:  # load-balancing and router z-loss, over MoE layers
            total += moe.aux_loss_coef * aux["moe_load_balance"] \
                + moe.z_loss_coef * aux["moe_z_loss"]
        if "attn_gate_loss" in aux:  # gate distillation, averaged over learned layers
            total += gate_coef * aux["attn_gate_loss"]
        return total, {"loss": ce, **aux}

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        structure = state.structure
        if sparsity is not None:
            structure = sparsity.prepare(state.step, structure)
        (_, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, structure,
                                                                     batch, state.step)
        grads_for_optimizer = grads
        for engine in engines:
            grads_for_optimizer = engine.optimizer_grads(state.step, grads_for_optimizer,
                                                         state.params, structure)
        updates, opt_state = program.optimizer.update(grads_for_optimizer, state.opt_state,
                                                      state.params)
        params = optax.apply_updates(state.params, updates)
        steps_done = state.step + 1
        counts, now = accounting.update_state(state.accounting, structure, steps_done)
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        for i, engine in enumerate(engines):
            params, structure, opt_state = engine.update(steps_done, params, structure,
                                                         opt_state, grads,
                                                         jax.random.fold_in(key, i))
        grad_norm = optax.tree.norm(grads_for_optimizer)
        # A non-finite loss or gradient norm leaves the state as it was (only the step count
        # moves on, past this batch): a poisoned state never exists, so it is never saved.
        # The loop reads `nonfinite` and stops or skips (train.nan_policy). The select fuses
        # into the update; finite steps are bit-identical to an unguarded step.
        finite = jnp.isfinite(parts["loss"]) & jnp.isfinite(grad_norm)
        kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                            (params, structure, opt_state, counts),
                            (state.params, state.structure, state.opt_state, state.accounting))
        metrics = {**parts, "grad_norm": grad_norm, "lr": program.schedule(state.step), **now,
                   "avg_nonzero_params": counts["avg_nonzero_params"],
                   "nonfinite": jnp.logical_not(finite)}
        new_state = TrainState(step=steps_done, params=kept[0], structure=kept[1],
                               opt_state=kept[2], rng=state.rng, accounting=kept[3])
        return new_state, metrics

    return train_step


def make_eval_step(program: Program) -> Callable[[TrainState, Batch], Metrics]:
    """Summed loss and token count, so batches of any size average exactly."""
    model_def, sparsity = program.model_def, program.sparsity

    def eval_step(state: TrainState, batch: Batch) -> Metrics:
        structure = state.structure
        if sparsity is not None:
            structure = sparsity.prepare(state.step, structure)
        losses = token_losses(model_def, state.params, structure, batch, state.step)
        return {"loss_sum": jnp.sum(losses), "tokens": jnp.asarray(losses.size, jnp.float32)}

    return eval_step
