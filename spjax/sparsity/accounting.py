"""Parameter and FLOP accounting that follows the masks, step by step.

- non-zero parameters: every parameter outside masked layers, plus the kept weights;
- average non-zero parameters over training: the N of 'The Journey Matters' law;
- training FLOPs per token actually needed: forward and input gradient at the non-zeros of
  each masked layer, weight gradient at the non-zeros for hard-mask methods (sparse training
  needs no gradient of pruned weights) but dense for straight-through methods, plus the dense
  layers and causal attention exactly as in train/flops.py. Embedding lookups and norms do
  no matmul work.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from spjax.config import ModelConfig
from spjax.sparsity.engine import SparsityEngine
from spjax.train import flops as flops_lib


@dataclasses.dataclass(frozen=True)
class Accounting:
    total_params: int  # dense count of every parameter
    matmul_params: int  # dense count of parameters in matmuls (all linear layers)
    attention_flops_per_token: float
    engine: SparsityEngine | None

    @classmethod
    def build(cls, config: ModelConfig, seq_len: int, total_params: int,
              engine: SparsityEngine | None) -> Accounting:
        attention = flops_lib.train_flops_per_token(config, seq_len) \
            - 6 * flops_lib.matmul_params(config)
        return cls(total_params, flops_lib.matmul_params(config), attention, engine)

    @property
    def dense_flops_per_token(self) -> float:
        return 6 * self.matmul_params + self.attention_flops_per_token

    def measure(self, structure: Any) -> dict[str, jax.Array]:
        """Current non-zero parameters and training FLOPs per token (fp32 scalars)."""
        if self.engine is None:
            return {"nonzero_params": jnp.float32(self.total_params),
                    "flops_per_token": jnp.float32(self.dense_flops_per_token)}
        kept = sum(self.engine.nonzero_counts(structure).values()).astype(jnp.float32)
        masked = self.engine.masked_size
        dense_linear = self.matmul_params - masked
        weight_grad = masked if self.engine.dense_weight_gradient else kept
        flops = 2 * (dense_linear + kept) * 2 + 2 * (dense_linear + weight_grad)
        return {"nonzero_params": self.total_params - masked + kept,
                "flops_per_token": flops + self.attention_flops_per_token}

    def initial_state(self, structure: Any) -> dict[str, jax.Array]:
        """Running means over steps, stored in the train state (and checkpointed)."""
        now = self.measure(structure)
        return {"avg_nonzero_params": now["nonzero_params"],
                "avg_flops_per_token": now["flops_per_token"]}

    def update_state(self, state: dict[str, jax.Array], structure: Any,
                     steps_done: jax.Array) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        """Folds this step's counts into the running means (a mean, not a sum, so fp32 keeps
        its precision over any number of steps); returns (new state, this step's counts)."""
        now = self.measure(structure)
        weight = 1.0 / steps_done.astype(jnp.float32)
        new = {"avg_nonzero_params": state["avg_nonzero_params"]
               + (now["nonzero_params"] - state["avg_nonzero_params"]) * weight,
               "avg_flops_per_token": state["avg_flops_per_token"]
               + (now["flops_per_token"] - state["avg_flops_per_token"]) * weight}
        return new, now

    def layer_densities(self, structure: Any) -> dict[str, float]:
        if self.engine is None:
            return {}
        counts = jax.device_get(self.engine.nonzero_counts(structure))
        return {layer.name: int(counts[layer.name]) / (layer.shape[0] * layer.shape[1])
                for layer in self.engine.layers}
