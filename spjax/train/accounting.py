"""FLOP and parameter accounting, in one place: the dense model's training FLOPs and MFU, and
the running accounting that follows the sparsity masks step by step.

## Dense FLOPs and MFU

Per token, a training step costs 6 x (parameters that take part in a matmul) -- forward 2,
backward 4 -- plus attention's score and value products. The embedding table is a gather, not a
matmul, and norm scales are elementwise, so neither counts. Attention is counted causally:
with a causal mask only about half of the T x T scores are computed (cuDNN and flash kernels
skip the rest), so per token and layer the products cost 2 x 2 x Hk x T / 2 forward, x 3 for
the training step: 6 x n_layers x Hk x T, where Hk = query heads x head_dim is d_model by
default and smaller with sparse-query attention (model.n_q_heads); grouped key/value heads
(model.n_kv_heads) change only the k and v projections. This is the conservative count; the
PaLM convention (no causal halving) would report attention FLOPs twice as large.

Block-sparse attention (model.attention_pattern) computes only the (query, key) pairs its
pattern keeps: `attention_flops_per_token` scales each layer's count by that share
(attention_patterns.pair_density). `train_flops_per_token` keeps the dense causal count.
A learned gate's mask is data-dependent: its layers count the density the gate measured
(the step metric attn_density), or before any measurement the top-k nominal density (exact
for top-k once the dense warm-up is over; 1.0 for threshold gates). The gate's distillation
target (one dense Q K^T forward per learned layer) is not counted.

## Accounting that follows the masks (`Accounting`, in the train state)

- non-zero parameters: every parameter outside masked layers, plus the kept weights;
- average non-zero parameters over training: the N of 'The Journey Matters' law;
- training FLOPs per token actually needed: forward and input gradient at the non-zeros of
  each masked layer, weight gradient at the non-zeros for hard-mask methods (sparse training
  needs no gradient of pruned weights) but dense for straight-through methods, plus the dense
  layers, and the causal attention that each layer's attention pattern computes
  (above; learned gates at their nominal density). "vs dense" compares with dense
  weights and dense causal attention. Embedding lookups and norms do no matmul work.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spjax.config import LEARNED, ModelConfig
from spjax.config import attention_patterns
from spjax.model import attention_gate
from spjax.sparsity.engine import SparsityEngine

# Dense bf16 tensor-core peak (no structured sparsity), FLOP/s, by device_kind substring.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
}


def matmul_params(config: ModelConfig) -> int:
    """Parameters one token multiplies by: attention (q d x Hk, k and v d x Gk, o Hk x d with
    H query and G key/value heads of k; 4d^2 by default), the MLP (for MoE layers the router
    and the top-k experts it is routed to, plus the shared expert), and the LM head."""
    d, f, moe = config.d_model, config.d_ff, config.moe
    f_e = moe.d_expert or f
    attention = 2 * d * query_width(config) + 2 * d * config.kv_heads * config.head_dim
    total = d * config.vocab_size  # LM head
    for i in range(config.n_layers):
        total += attention
        if moe.is_moe_layer(i):
            total += d * moe.num_experts + moe.top_k * 3 * d * f_e
            total += 3 * d * f_e if moe.shared_expert else 0
        else:
            total += 3 * d * f
    return total


def query_width(config: ModelConfig) -> int:
    """Query heads x head_dim: d_model unless sparse-query attention drops query heads."""
    return config.q_heads * config.head_dim


def train_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    attention = 6 * config.n_layers * query_width(config) * seq_len
    return 6 * matmul_params(config) + attention


def nominal_gate_density(config: ModelConfig, seq_len: int) -> float:
    """Pair density of a learned layer's mask after warm-up: top-k keeps k_i blocks of row i,
    the diagonal among them, whichever they are; a threshold gate's is unknown (1.0)."""
    section = config.attention_pattern
    gate, b = section.gate, section.block
    if gate.threshold > 0:
        return 1.0
    counts = attention_gate.topk_counts(seq_len // b, gate.density, gate.keep_first)
    pairs = np.sum(counts - 1) * b * b + len(counts) * b * (b + 1) / 2
    return float(pairs / (seq_len * (seq_len + 1) / 2))


def attention_densities(config: ModelConfig, seq_len: int, learned: float | None = None
                        ) -> dict[str, float]:
    """Per attention layer (layers/{i}/attn), the share of causal (query, key) pairs its
    pattern computes: 1.0 for dense; for learned layers `learned` (a measured density) or
    the nominal one."""
    section = config.attention_pattern
    densities = {}
    for name, kind in section.patterns(config.n_layers).items():
        if kind == "dense":
            densities[name] = 1.0
            continue
        if kind == LEARNED:
            densities[name] = (nominal_gate_density(config, seq_len) if learned is None
                               else float(learned))
            continue
        mask = attention_patterns.build(
            kind, seq_len=seq_len, block=section.block, window=section.window,
            global_tokens=section.global_tokens, stride=section.stride,
            dilation=section.dilation, path=section.path, heads=config.q_heads)
        densities[name] = attention_patterns.pair_density(mask, section.block)
    return densities


def attention_flops_per_token(config: ModelConfig, seq_len: int,
                              learned: float | None = None) -> tuple[float, float]:
    """(computed, dense causal) training FLOPs per token of the attention score and value
    products, summed over layers; `learned`: the gates' measured density."""
    per_layer = 6 * query_width(config) * seq_len
    densities = attention_densities(config, seq_len, learned)
    return per_layer * sum(densities.values()), per_layer * config.n_layers


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of the device, or None when unknown (CPU)."""
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    for name, peak in PEAK_BF16_FLOPS.items():
        if name in kind:
            return peak
    return None


# ----------------------------------------------------------------------------- accounting


@dataclasses.dataclass(frozen=True)
class Accounting:
    total_params: int  # dense count of every parameter
    matmul_params: int  # dense count of parameters in matmuls (all linear layers)
    attention_flops_per_token: float  # what the layers' attention patterns compute
    engine: SparsityEngine | None
    # share of tokens each expert of an (E, I, O) stack multiplies: top_k / E (balanced
    # routing, as the dense count above does)
    expert_fraction: float = 1.0
    dense_attention_flops_per_token: float = 0.0  # dense causal attention, the baseline

    @classmethod
    def build(cls, config: ModelConfig, seq_len: int, total_params: int,
              engine: SparsityEngine | None) -> Accounting:
        attention, dense_attention = attention_flops_per_token(config, seq_len)
        fraction = config.moe.top_k / config.moe.num_experts if config.moe.num_experts else 1.0
        return cls(total_params, matmul_params(config), attention, engine, fraction,
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
