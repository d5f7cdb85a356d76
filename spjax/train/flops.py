"""Training FLOPs and model FLOPs utilization (MFU).

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
"""

from __future__ import annotations

import jax

import numpy as np

from spjax.config import LEARNED, ModelConfig
from spjax.model import attention_gate, attention_patterns

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
