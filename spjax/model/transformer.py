"""LLaMA-style decoder-only language model in Flax NNX.

RMSNorm (pre-norm), rotary position embeddings (rotate-half convention of HF LLaMA), SwiGLU
MLP, causal attention with optional grouped-query (model.n_kv_heads) and sparse-query
(model.n_q_heads) heads, dense, block-sparse or gated by a learned block gate ('learned',
attention_gate.py) per layer by model.attention_pattern, untied embedding and LM head, no
biases, N(0, 0.02) init.
Every projection, the LM head included, comes from the `LinearFactory`, so sparse and
low-rank structures plug in without touching this file.

Shapes are suffixed on names where they matter: B batch, T sequence, D model, H query heads,
G key/value heads, K head dim, F MLP hidden, V vocabulary.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from spjax import parallel
from spjax.config import LEARNED, ModelConfig
from spjax.model import attention_gate, sparse_attention
from spjax.model.linear import LinearSpec, normal_init
from spjax.model.moe import MoE
from spjax.model.structures import LinearFactory, dense_everywhere

ACTIVATION_AXES = ("batch", "seq", "act_embed")


def resolve_attention(config: ModelConfig) -> str:
    """'auto' -> cuDNN flash attention on GPU in half precision, XLA elsewhere."""
    if config.attention != "auto":
        return config.attention
    on_gpu = jax.default_backend() == "gpu"
    return "cudnn" if on_gpu and config.compute_dtype == "bfloat16" else "xla"


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype: jnp.dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), axes=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)  # statistics in fp32 whatever the compute dtype
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles_TxK2 = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    angles_TxK = jnp.concatenate([angles_TxK2, angles_TxK2], axis=-1)
    return jnp.cos(angles_TxK), jnp.sin(angles_TxK)


def apply_rope(x_BxTxHxK: jax.Array, cos_TxK: jax.Array, sin_TxK: jax.Array) -> jax.Array:
    """Rotates each head's pairs (i, i + K/2) by the position's angles. The tables are
    (T, K), shared by the batch, or (B, T, K), one row of positions per sequence (decoding
    sequences of different lengths)."""
    half = x_BxTxHxK.shape[-1] // 2
    x32 = x_BxTxHxK.astype(jnp.float32)
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    if cos_TxK.ndim == 2:
        cos_TxK, sin_TxK = cos_TxK[None], sin_TxK[None]
    out = x32 * cos_TxK[:, :, None, :] + rotated * sin_TxK[:, :, None, :]
    return out.astype(x_BxTxHxK.dtype)


class Attention(nnx.Module):
    def __init__(self, name: str, config: ModelConfig, linear: LinearFactory, rngs: nnx.Rngs):
        d, self.head_dim = config.d_model, config.head_dim
        # H query heads (n_q_heads, SQA; n_heads by default), G key/value heads (GQA/MQA)
        self.q_heads, self.kv_heads = config.q_heads, config.kv_heads
        self.implementation = resolve_attention(config)
        self.name = name
        self.pattern = config.attention_pattern.pattern_for(name)  # 'dense': cuDNN/XLA
        self.pattern_config = config.attention_pattern
        q_width, kv_width = self.q_heads * self.head_dim, self.kv_heads * self.head_dim
        self.q = linear(f"{name}/q", d, q_width, ("embed", "heads"), rngs)
        self.k = linear(f"{name}/k", d, kv_width, ("embed", "heads"), rngs)
        self.v = linear(f"{name}/v", d, kv_width, ("embed", "heads"), rngs)
        self.o = linear(f"{name}/o", q_width, d, ("heads", "embed"), rngs)
        if self.pattern == LEARNED:  # layers/{i}/attn/gate/{q,k}
            self.gate = attention_gate.AttentionGate(config, rngs)

    def __call__(self, x_BxTxD: jax.Array, cos_TxK: jax.Array, sin_TxK: jax.Array,
                 step: jax.Array | None = None) -> jax.Array:
        return self.forward(x_BxTxD, cos_TxK, sin_TxK, step)[0]

    def forward(self, x_BxTxD: jax.Array, cos_TxK: jax.Array, sin_TxK: jax.Array,
                step: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(output, the gate's losses and densities for a learned layer, or {})."""
        b, t, _ = x_BxTxD.shape
        q_BxTxHxK, k_BxTxGxK, v_BxTxGxK = self.project(x_BxTxD, cos_TxK, sin_TxK)
        out_BxTxHxK, aux = self.attend(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, step)
        return self.o(out_BxTxHxK.reshape(b, t, -1)), aux

    def project(self, x_BxTxD: jax.Array, cos_TxK: jax.Array, sin_TxK: jax.Array
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q (H heads), k and v (G heads), RoPE applied at the positions of cos/sin; the
        KV-cache decode (spjax/generate) projects through this too."""
        b, t, _ = x_BxTxD.shape
        split = lambda y, heads: y.reshape(b, t, heads, self.head_dim)  # noqa: E731
        q_BxTxHxK = apply_rope(split(self.q(x_BxTxD), self.q_heads), cos_TxK, sin_TxK)
        k_BxTxGxK = apply_rope(split(self.k(x_BxTxD), self.kv_heads), cos_TxK, sin_TxK)
        return q_BxTxHxK, k_BxTxGxK, split(self.v(x_BxTxD), self.kv_heads)

    def attend(self, q_BxTxHxK: jax.Array, k_BxTxGxK: jax.Array, v_BxTxGxK: jax.Array,
               step: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Causal attention over the whole sequence under this layer's pattern; (output
        heads, the gate's terms or {})."""
        # query head h reads key/value head h // (H / G), in every path
        aux: dict[str, jax.Array] = {}
        if self.pattern == LEARNED:
            out_BxTxHxK, aux = attention_gate.gated_attention(
                self.gate, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, self.pattern_config, self.name,
                step)
        elif self.pattern == "dense":
            out_BxTxHxK = jax.nn.dot_product_attention(
                q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, is_causal=True,
                implementation=self.implementation)
        else:
            out_BxTxHxK = sparse_attention.attend(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK,
                                                  self.pattern, self.pattern_config, self.name)
        return out_BxTxHxK, aux


class SwiGLU(nnx.Module):
    def __init__(self, name: str, config: ModelConfig, linear: LinearFactory, rngs: nnx.Rngs):
        d, f = config.d_model, config.d_ff
        self.gate = linear(f"{name}/gate", d, f, ("embed", "mlp"), rngs)
        self.up = linear(f"{name}/up", d, f, ("embed", "mlp"), rngs)
        self.down = linear(f"{name}/down", f, d, ("mlp", "embed"), rngs)

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        return self.down(jax.nn.silu(self.gate(x_BxTxD)) * self.up(x_BxTxD))


class Block(nnx.Module):
    def __init__(self, name: str, config: ModelConfig, linear: LinearFactory, rngs: nnx.Rngs,
                 moe: bool = False):
        param_dtype = jnp.dtype(config.param_dtype)
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps, param_dtype)
        self.attn = Attention(f"{name}/attn", config, linear, rngs)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps, param_dtype)
        self.is_moe = moe
        # 'moe' or 'mlp': the layer names ('layers/3/moe/gate') say which one rules match
        if moe:
            self.moe = MoE(f"{name}/moe", config, linear, rngs)
        else:
            self.mlp = SwiGLU(f"{name}/mlp", config, linear, rngs)

    def __call__(self, x_BxTxD: jax.Array, cos_TxK: jax.Array, sin_TxK: jax.Array,
                 step: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(new residual stream, this block's MoE router losses and attention gate terms)."""
        attn_out, aux = self.attn.forward(self.attn_norm(x_BxTxD), cos_TxK, sin_TxK, step)
        x_BxTxD = x_BxTxD + attn_out
        if self.is_moe:
            out, moe_aux = self.moe(self.mlp_norm(x_BxTxD))
            aux = {**aux, **{f"moe_{k}": v for k, v in moe_aux.items()}}
        else:
            out = self.mlp(self.mlp_norm(x_BxTxD))
        x_BxTxD = x_BxTxD + out
        return parallel.constrain(x_BxTxD, ACTIVATION_AXES), aux


_REMAT_POLICIES = {
    "full": None,  # save nothing inside a block, recompute everything
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs,
                 assign: Callable[[str], LinearSpec] = dense_everywhere):
        """`assign(layer_name)` gives each linear layer its structure (sparsity rules)."""
        if config.vocab_size <= 0:
            raise ValueError("model.vocab_size must be resolved (from the dataset) before building")
        self.config = config
        param_dtype = jnp.dtype(config.param_dtype)
        self.compute_dtype = jnp.dtype(config.compute_dtype)
        linear = LinearFactory(assign, config.init_std, param_dtype, self.compute_dtype)
        self.embed = nnx.Param(
            normal_init(config.init_std)(rngs.params(), (config.vocab_size, config.d_model),
                                         param_dtype), axes=("vocab", "embed"))
        self.layers = nnx.List(
            [Block(f"layers/{i}", config, linear, rngs, moe=config.moe.is_moe_layer(i))
             for i in range(config.n_layers)])
        self.final_norm = RMSNorm(config.d_model, config.norm_eps, param_dtype)
        self.lm_head = linear("lm_head", config.d_model, config.vocab_size, ("embed", "vocab"),
                              rngs, out_dtype=jnp.float32)

    def __call__(self, tokens_BxT: jax.Array) -> jax.Array:
        """Token ids -> fp32 logits_BxTxV."""
        return self.forward(tokens_BxT)[0]

    def forward(self, tokens_BxT: jax.Array, step: jax.Array | None = None
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Token ids -> (fp32 logits_BxTxV, aux): aux holds the MoE router losses
        (moe_load_balance, moe_z_loss) averaged over MoE layers and the attention gate terms
        (attn_gate_loss, attn_density, attn_gate_recall) averaged over learned layers, or is
        {}. `step` (the optimizer step) ends the gates' dense warm-up; None: gates on."""
        cos_TxK, sin_TxK = rope_tables(tokens_BxT.shape[1], self.config.head_dim,
                                       self.config.rope_theta)
        x_BxTxD = jnp.take(self.embed[...], tokens_BxT, axis=0).astype(self.compute_dtype)
        x_BxTxD = parallel.constrain(x_BxTxD, ACTIVATION_AXES)

        def run_block(block: Block, x: jax.Array, step: jax.Array | None):
            return block(x, cos_TxK, sin_TxK, step)

        if self.config.remat != "none":
            run_block = nnx.remat(run_block, policy=_REMAT_POLICIES[self.config.remat])
        per_key: dict[str, list[jax.Array]] = {}
        for block in self.layers:
            x_BxTxD, aux = run_block(block, x_BxTxD, step)
            for key, value in aux.items():  # each key over the layers that have it
                per_key.setdefault(key, []).append(value)
        aux = {key: sum(values) / len(values) for key, values in per_key.items()}
        return self.lm_head(self.final_norm(x_BxTxD)), aux


def attention_params(config: ModelConfig) -> int:
    """Attention projections of one layer: q d x H k, k and v d x G k each, o H k x d
    (H query heads, G key/value heads, k head_dim); 4d^2 with the defaults."""
    d, q_width = config.d_model, config.q_heads * config.head_dim
    return 2 * d * q_width + 2 * d * config.kv_heads * config.head_dim


def closed_form_param_count(config: ModelConfig) -> int:
    """Parameters: per layer the attention projections (`attention_params`, 4d^2 by default)
    [+ a learned layer's gate] + 2d and an MLP of 3df (dense) or, for MoE layers,
    E 3 d f_e + d E (router) [+ 3 d f_e shared]; plus 2Vd + d."""
    d, f, v, n = config.d_model, config.d_ff, config.vocab_size, config.n_layers
    moe = config.moe
    f_e = moe.d_expert or f
    total = 2 * v * d + d
    gate = config.attention_pattern.gate.d_gate * (config.q_heads + 3 * config.kv_heads) \
        * config.head_dim  # a learned layer's gate: G x ((H/G) k + 3k) x d_gate
    total += gate * len(config.attention_pattern.learned_layers(n))
    for i in range(n):
        total += attention_params(config) + 2 * d
        if moe.is_moe_layer(i):
            total += moe.num_experts * 3 * d * f_e + d * moe.num_experts
            total += 3 * d * f_e if moe.shared_expert else 0
        else:
            total += 3 * d * f
    return total
