"""Checks that involve more than one config section (each section checks its own values in
its `validate()`). `check` runs them all; `Config.validate` calls it after every section's own
checks, so the first error a user sees names the first bad value."""

from __future__ import annotations

from typing import TYPE_CHECKING

from spjax.config import attention_patterns
from spjax.config.model import LEARNED
from spjax.errors import ConfigError, not_a_directory
from spjax.rules import Rules

if TYPE_CHECKING:
    from spjax.config.run import Config


def check(config: Config) -> None:
    experts = config.model.moe.num_experts
    if experts and experts % config.parallel.expert:
        raise ConfigError(f"model.moe.num_experts ({experts}) must be divisible by "
                          f"parallel.expert ({config.parallel.expert})")
    if config.model.moe.capacity_factor > 0 and config.parallel.expert > 1:
        raise ConfigError("model.moe.capacity_factor routes per data shard; with "
                          "parallel.expert > 1 use dropless routing (capacity_factor=0)")
    if config.parallel.expert > 1 and not experts:
        raise ConfigError("parallel.expert > 1 needs a mixture-of-experts model "
                          "(model.moe.num_experts > 0)")
    problem = not_a_directory(config.run_dir)
    if problem:
        raise ConfigError(f"run_dir '{config.run_dir}' cannot be a directory ({problem}); "
                          f"set run_dir to a new or existing directory")
    _validate_attention_patterns(config)
    _validate_block_kernel(config)
    _validate_gate_training(config)
    _validate_head_sharding(config)
    if config.lowrank.method == "galore" and config.sparsity.enabled:
        raise ConfigError("lowrank.method 'galore' projects dense gradients and cannot be "
                          "combined with sparsity.method; use one of them")

def _validate_block_kernel(config: Config) -> None:
    """The Mosaic GPU block-sparse kernels' limits (wgmma: 16-bit operands, 64-wide
    swizzled chunks), at start-up instead of as a traceback inside the first step."""
    section, kernel = config.sparsity, config.sparsity.kernel
    if not (section.enabled and section.pattern == "block" and kernel.startswith("mosaic")):
        return
    if section.block not in (64, 128):
        raise ConfigError(f"sparsity.kernel={kernel} (Mosaic GPU) takes blocks of 64 or 128, "
                          f"got sparsity.block={section.block}; set sparsity.block=128 or "
                          f"sparsity.kernel=pallas")
    if config.model.compute_dtype != "bfloat16":
        raise ConfigError(f"sparsity.kernel={kernel} (Mosaic GPU) multiplies in bfloat16, "
                          f"got model.compute_dtype={config.model.compute_dtype}; set "
                          f"model.compute_dtype=bfloat16 or sparsity.kernel=pallas")

def _validate_gate_training(config: Config) -> None:
    if config.train.trainable != "gate":
        return
    if not config.model.attention_pattern.learned_layers(config.model.n_layers):
        raise ConfigError("train.trainable=gate trains only attention gates, but no layer "
                          "is 'learned'; set model.attention_pattern.rules, e.g. "
                          "'[[\".*\", learned]]'")
    if config.sparsity.enabled or config.lowrank.method != "none":
        raise ConfigError("train.trainable=gate freezes the model's weights; it cannot be "
                          "combined with sparsity.method or lowrank.method (set them to "
                          "none)")

def _validate_head_sharding(config: Config) -> None:
    """Grouped key/value heads split over `tensor` (logical axis 'heads') must be whole
    heads per shard: the query heads of a shard must find their key/value heads on it.
    (Without grouping q, k and v split alike, as they always have.)"""
    model, tensor = config.model, config.parallel.tensor
    target = Rules.from_pairs(config.parallel.rules, source="parallel.rules").lookup(
        "heads", None)
    if tensor <= 1 or "tensor" not in ((target,) if isinstance(target, str)
                                       else tuple(target or ())):
        return
    if model.kv_heads < model.q_heads and model.kv_heads % tensor:
        raise ConfigError(f"model.n_kv_heads ({model.n_kv_heads}) must be divisible by "
                          f"parallel.tensor ({tensor}), which splits the heads; use a "
                          f"multiple of {tensor} key/value heads or a smaller parallel.tensor")

def _validate_attention_patterns(config: Config) -> None:
    """Each pattern in use must fit data.seq_len (window shorter than the sequence...)."""
    section = config.model.attention_pattern
    kinds = set(section.patterns(config.model.n_layers).values())
    if LEARNED in kinds and config.data.seq_len % section.block:
        raise ConfigError(f"model.attention_pattern.block ({section.block}) must divide "
                          f"data.seq_len ({config.data.seq_len}) for the learned gate; pick "
                          f"a block dividing the sequence length")
    for kind in sorted(kinds - {"dense", LEARNED}):
        try:
            attention_patterns.build(
                kind, seq_len=config.data.seq_len, block=section.block, window=section.window,
                global_tokens=section.global_tokens, stride=section.stride,
                dilation=section.dilation, path=section.path, heads=config.model.q_heads)
        except ConfigError as e:
            raise ConfigError(f"model.attention_pattern (data.seq_len {config.data.seq_len}):"
                              f" {e}") from None
