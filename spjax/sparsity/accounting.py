"""Parameter and FLOP accounting that follows the masks, step by step.

- non-zero parameters: every parameter outside masked layers, plus the kept weights;
- average non-zero parameters over training: the N of 'The Journey Matters' law;
- training FLOPs per token actually needed: forward and input gradient at the non-zeros of
  each masked layer, weight gradient at the non-zeros for hard-mask methods (sparse training
  needs no gradient of pruned weights) but dense for straight-through methods, plus the dense
  layers, and the causal attention that each layer's attention pattern computes
  (train/flops.py; learned gates at their nominal density). "vs dense" compares with dense
  weights and dense causal attention. Embedding lookups and norms do no matmul work.
"""

from __future__ import annotations

import dataclasses
import math
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
    attention_flops_per_token: float  # what the layers' attention patterns compute
    engine: SparsityEngine | None
    # share of tokens each expert of an (E, I, O) stack multiplies: top_k / E (balanced
    # routing, as train/flops.py counts the dense model)
    expert_fraction: float = 1.0
    dense_attention_flops_per_token: float = 0.0  # dense causal attention, the baseline

    @classmethod
    def build(cls, config: ModelConfig, seq_len: int, total_params: int,
              engine: SparsityEngine | None) -> Accounting:
        attention, dense_attention = flops_lib.attention_flops_per_token(config, seq_len)
        fraction = config.moe.top_k / config.moe.num_experts if config.moe.num_experts else 1.0
        return cls(total_params, flops_lib.matmul_params(config), attention, engine, fraction,
                   dense_attention)

    def _per_token(self, layer) -> float:
        """How many times per token a weight of `layer` is used in the forward."""
        return self.expert_fraction if len(layer.shape) == 3 else 1.0

    @property
    def dense_flops_per_token(self) -> float:
        return 6 * self.matmul_params + self.dense_attention_flops_per_token

    def measure(self, structure: Any) -> dict[str, jax.Array]:
        """Current non-zero parameters and training FLOPs per token (fp32 scalars)."""
        if self.engine is None:
            return {"nonzero_params": jnp.float32(self.total_params),
                    "flops_per_token": jnp.float32(6 * self.matmul_params
                                                   + self.attention_flops_per_token)}
        counts = self.engine.nonzero_counts(structure)
        kept = sum(counts.values()).astype(jnp.float32)
        masked = self.engine.masked_size
        # matmul work per token: expert weights count top_k / E of their size
        kept_used = sum(counts[layer.name].astype(jnp.float32) * self._per_token(layer)
                        for layer in self.engine.layers)
        masked_used = sum(math.prod(layer.shape) * self._per_token(layer)
                          for layer in self.engine.layers)
        dense_linear = self.matmul_params - masked_used
        weight_grad = masked_used if self.engine.dense_weight_gradient else kept_used
        flops = 2 * (dense_linear + kept_used) * 2 + 2 * (dense_linear + weight_grad)
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
        return {layer.name: int(counts[layer.name]) / math.prod(layer.shape)
                for layer in self.engine.layers}
