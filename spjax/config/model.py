"""The model section of the run configuration: architecture, mixture-of-experts and attention
patterns (frozen dataclasses, validated; loading.py reads them with the other sections)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from spjax.errors import ConfigError
from spjax.config import attention_patterns
from spjax.rules import RuleList, Rules

# The pattern of layers whose block mask a learned gate computes (attention_gate.py)
LEARNED = "learned"



@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-experts MLPs in layers first, first + every, ... (num_experts 0: none)."""

    num_experts: int = 0
    top_k: int = 2
    d_expert: int = 0  # 0: model.d_ff
    every: int = 1
    first: int = 0
    shared_expert: bool = False  # a dense SwiGLU of width d_expert beside the experts
    capacity_factor: float = 0.0  # 0: dropless; > 0: per-expert capacity, overflow dropped
    aux_loss_coef: float = 0.01  # load balancing (Switch / GShard)
    z_loss_coef: float = 1e-3  # router z-loss (ST-MoE)
    grouped_gemm: Literal["auto", "ragged_dot", "pallas"] = "auto"
    # expert-parallel exchange: padded all_to_all (any backend) or ragged_all_to_all (GPU:
    # only routed rows move); auto = padded until ragged is measured on GPUs
    dispatch: Literal["auto", "padded", "ragged"] = "auto"

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, index: int) -> bool:
        return self.enabled and index >= self.first and (index - self.first) % self.every == 0

    def validate(self) -> None:
        if not self.enabled:
            return
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"model.moe.top_k ({self.top_k}) must lie in [1, num_experts = "
                              f"{self.num_experts}]")
        if self.every < 1 or self.first < 0 or self.d_expert < 0:
            raise ConfigError("model.moe.every must be >= 1, model.moe.first and d_expert >= 0")
        if self.capacity_factor < 0:
            raise ConfigError(f"model.moe.capacity_factor must be >= 0 (0: dropless), got "
                              f"{self.capacity_factor}")


@dataclasses.dataclass(frozen=True)
class AttentionGateConfig:
    """The learned block gate of `learned` layers (spjax/model/attention_gate.py,
    docs/ATTENTION.md): pooled Q and K per block -> block scores -> a top-k or threshold block
    mask, trained by distillation from block-pooled dense attention."""

    density: float = 0.25  # top-k: share of each query block row's causal key blocks kept
    threshold: float = 0.0  # > 0: keep key blocks of gate probability >= threshold instead
    keep_first: bool = False  # always keep key block 0 too (attention sink); diagonal always
    d_gate: int = 64  # width of the pooled-Q and pooled-K projections
    loss_coef: float = 1.0  # distillation (KL) loss weight in the train loss
    dense_until: int = 0  # steps of dense attention while the gate distills (warm-up)
    # distill on every k-th query block row only: the target is a dense Q K^T in XLA per
    # learned layer and step, which at 8k tokens costs more than the sparse attention saves
    target_row_stride: int = 1
    # the target's implementation: xla (jnp), pallas (one fused kernel per target row, GPU),
    # interpret (that kernel on CPU); auto = pallas on GPU, xla elsewhere
    target_kernel: Literal["auto", "xla", "pallas", "interpret"] = "auto"

    def validate(self) -> None:
        where = "model.attention_pattern.gate"
        if not 0 < self.density <= 1:
            raise ConfigError(f"{where}.density must lie in (0, 1] (the share of causal key "
                              f"blocks each query block keeps), got {self.density}")
        if not 0 <= self.threshold < 1:
            raise ConfigError(f"{where}.threshold must lie in [0, 1) (0: top-k by density), "
                              f"got {self.threshold}")
        if self.d_gate <= 0:
            raise ConfigError(f"{where}.d_gate must be > 0, got {self.d_gate}")
        if self.loss_coef < 0:
            raise ConfigError(f"{where}.loss_coef must be >= 0, got {self.loss_coef}")
        if self.target_row_stride < 1:
            raise ConfigError(f"{where}.target_row_stride must be >= 1 (1: every query block "
                              f"row gets a target), got {self.target_row_stride}")
        if self.dense_until < 0:
            raise ConfigError(f"{where}.dense_until must be >= 0 (steps), got "
                              f"{self.dense_until}")


@dataclasses.dataclass(frozen=True)
class AttentionPatternConfig:
    """Block-sparse attention (pallas_kernels/block_sparse_attention). `rules` give each
    layer's attention, named `layers/{i}/attn`, a pattern of spjax/config/attention_patterns
    (first matching regex wins); 'dense' keeps jax.nn.dot_product_attention. Sizes are in
    tokens, multiples of `block`, and shared by every layer with that pattern."""

    rules: RuleList = ((".*", "dense"),)
    block: int = 64  # tile of the block mask, in tokens (64 or 128 on GPU)
    window: int = 0  # sliding_window, global_local, strided, dilated: local window
    global_tokens: int = 0  # global_local: leading tokens every query sees
    stride: int = 0  # strided: distance between the strided key blocks
    dilation: int = 1  # dilated: blocks between kept key blocks
    path: str = ""  # file: a .npy block mask (T/block, T/block) or (query heads, ...)
    # auto: Mosaic GPU on Hopper at block 128 (bf16/f16, head_dim 64/128), the Triton-lowered
    # Pallas kernels on other GPUs, the reference elsewhere; mosaic: Mosaic GPU (Hopper, bf16,
    # blocks 64/128, head_dim 64/128); mosaic_fwd: Mosaic forward, Triton backward;
    # *interpret: the same kernels interpreted on CPU (tests)
    kernel: Literal["auto", "pallas", "xla", "interpret", "mosaic", "mosaic_fwd",
                    "mosaic_interpret"] = "auto"
    # Mosaic kernels: the backward as one fused kernel (dQ added across key blocks by TMA
    # reduce-add; 1.2x faster dense-pattern forward+backward on the H200) or, false, the
    # separate dQ and dK/dV kernels
    fused_backward: bool = True
    gate: AttentionGateConfig = AttentionGateConfig()  # `learned` layers

    def pattern_for(self, layer: str) -> str:
        return Rules.from_pairs(self.rules, "model.attention_pattern.rules").lookup(layer)

    def patterns(self, n_layers: int) -> dict[str, str]:
        return {f"layers/{i}/attn": self.pattern_for(f"layers/{i}/attn")
                for i in range(n_layers)}

    def learned_layers(self, n_layers: int) -> list[str]:
        return [name for name, kind in self.patterns(n_layers).items() if kind == LEARNED]

    def validate(self, n_layers: int) -> None:
        kinds = (*attention_patterns.KINDS, LEARNED)
        for i, (_, value) in enumerate(self.rules):
            if value not in kinds:
                raise ConfigError(f"model.attention_pattern.rules[{i}]: pattern must be one of "
                                  f"{', '.join(kinds)}, got {value!r}")
        self.patterns(n_layers)  # every layer matches a rule
        self.gate.validate()
        if self.block < 16 or self.block & (self.block - 1):
            raise ConfigError(f"model.attention_pattern.block must be a power of two >= 16, "
                              f"got {self.block}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str = "tiny"
    vocab_size: int = 0  # 0: take the tokenizer's vocabulary size from the dataset
    d_model: int = 128
    d_ff: int = 352
    n_heads: int = 4  # sets head_dim = d_model / n_heads
    # Grouped-query attention: key/value heads (0: as many as the query heads); 1 is MQA
    n_kv_heads: int = 0
    # Sparse Query Attention: query heads (0: n_heads); fewer cut the attention FLOPs, with
    # head_dim kept, so q and o shrink to d_model x n_q_heads * head_dim (docs/ATTENTION.md)
    n_q_heads: int = 0
    n_layers: int = 4
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    param_dtype: Literal["float32", "bfloat16"] = "float32"  # master weights
    compute_dtype: Literal["float32", "bfloat16"] = "bfloat16"
    attention: Literal["auto", "xla", "cudnn"] = "auto"  # auto: cuDNN on GPU, XLA elsewhere
    remat: Literal["none", "full", "dots"] = "none"  # activation checkpointing per block
    moe: MoEConfig = MoEConfig()
    attention_pattern: AttentionPatternConfig = AttentionPatternConfig()

    def validate(self) -> None:
        for key in ("d_model", "d_ff", "n_heads", "n_layers"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"model.{key} must be > 0, got {getattr(self, key)}")
        if self.vocab_size < 0:
            raise ConfigError(f"model.vocab_size must be >= 0 (0 = from data), got {self.vocab_size}")
        for key in ("rope_theta", "norm_eps"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"model.{key} must be > 0, got {getattr(self, key)}")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})")
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError(f"model.d_model / model.n_heads must be even for RoPE, got "
                              f"{self.d_model // self.n_heads}")
        self._validate_heads()
        self.moe.validate()
        self.attention_pattern.validate(self.n_layers)

    def _validate_heads(self) -> None:
        for key in ("n_kv_heads", "n_q_heads"):
            if getattr(self, key) < 0:
                raise ConfigError(f"model.{key} must be >= 0 (0 = default), got "
                                  f"{getattr(self, key)}")
        if self.n_q_heads > self.n_heads:
            raise ConfigError(f"model.n_q_heads ({self.n_q_heads}) is more query heads than "
                              f"allowed: at most model.n_heads ({self.n_heads}), since head_dim "
                              f"= d_model / n_heads; lower model.n_q_heads or raise n_heads")
        q_key = "model.n_q_heads" if self.n_q_heads else "model.n_heads"
        if self.kv_heads > self.q_heads:
            raise ConfigError(f"model.n_kv_heads ({self.n_kv_heads}) is more than the "
                              f"{self.q_heads} query heads ({q_key}); set n_kv_heads <= "
                              f"{self.q_heads}")
        if self.q_heads % self.kv_heads:
            raise ConfigError(f"{q_key} ({self.q_heads}) must be a multiple of model.n_kv_heads "
                              f"({self.n_kv_heads}) for grouped-query attention; choose "
                              f"n_kv_heads dividing {self.q_heads}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def q_heads(self) -> int:
        """Query heads: n_q_heads, or n_heads by default."""
        return self.n_q_heads or self.n_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_kv_heads, or as many as the query heads by default."""
        return self.n_kv_heads or self.q_heads
