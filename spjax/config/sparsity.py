"""The `sparsity:` config section: which layers are masked, with what pattern, density and
method. Each method reads its own sub-section, so every hyper-parameter is typed and has the
default of the paper it comes from.

    sparsity:
      method: rigl            # see METHODS
      sparsity: 0.9           # final fraction of zeros over the layers the rules mark 'sparse'
      pattern: unstructured   # unstructured | nm | block
      distribution: erk       # uniform | erk
      rules: [[".*/mlp/.*", 0.05], [".*/(attn|mlp)/.*", sparse], [".*", dense]]
      rigl: {drop_fraction: 0.3, update_every: 100, end_fraction: 0.75}
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from spjax.errors import ConfigError
from spjax.rules import RuleList


METHODS = ("none", "static", "oneshot", "gmp", "set", "rigl", "ste", "srste", "mdgf", "sdgf",
           "ast", "spdf")
# Methods whose effective weights follow a mask recomputed from dense weights every few steps
# (straight-through gradients reach the pruned weights); the rest prune and regrow for real.
STE_METHODS = ("ste", "srste", "mdgf", "sdgf", "ast")


@dataclasses.dataclass(frozen=True)
class OneShotConfig:
    at_fraction: float = 0.5  # prune by magnitude once, at this fraction of training


@dataclasses.dataclass(frozen=True)
class GradualConfig:
    """Gradual magnitude pruning (Zhu & Gupta): s(t) = s_f (1 - (1 - p)^power), p from 0 at
    start to 1 at end; 25% -> 75% of training per 'The Journey Matters'."""

    start_fraction: float = 0.25
    end_fraction: float = 0.75
    update_every: int = 100
    power: float = 3.0


@dataclasses.dataclass(frozen=True)
class DynamicConfig:
    """SET / RigL: every `update_every` steps until `end_fraction`, drop the smallest-magnitude
    fraction f(t) = (drop_fraction / 2)(1 + cos(pi t / T_end)) and regrow as many (random for
    SET, largest dense gradient for RigL); regrown weights start at zero."""

    drop_fraction: float = 0.3
    update_every: int = 100
    end_fraction: float = 0.75


@dataclasses.dataclass(frozen=True)
class STEConfig:
    """N:M (or any pattern) masks recomputed from |W| every `update_every` steps, dense
    straight-through gradients (STE), plus the family's extras:
      srste: gradient += srste_decay * (1 - M) * W                         (Zhou et al. 2021)
      mdgf:  forward W * (M + (1 - M) mu_t), mu_t = max(0, 1 - k t) or exp(-k t)
      sdgf:  N:M tightens over equal frames: stepwise 7:8 -> 4:8 -> 2:8 -> 1:8 or
             geometric 8:64 -> 4:32 -> 2:16 -> 1:8                     (Bambhaniya et al.)
      ast:   gradient += lambda_t * (1 - M) * W, lambda ramped 0 -> ast_decay over ramp_fraction
    `dense_fraction` trains dense first; `fine_tune_fraction` ends with a binary mask (mdgf)."""

    update_every: int = 1
    srste_decay: float = 2e-4
    mask_decay: Literal["linear", "exponential"] = "exponential"
    decay_coef: float = 2e-4
    structure_decay: Literal["stepwise", "geometric"] = "stepwise"
    ast_decay: float = 1e-4
    ramp_fraction: float = 0.25
    dense_fraction: float = 0.0
    fine_tune_fraction: float = 0.0


@dataclasses.dataclass(frozen=True)
class SPDFConfig:
    """Sparse pre-training, dense fine-tuning: static random sparsity, then at `dense_at_fraction`
    every mask is removed and the pruned weights train from zero."""

    dense_at_fraction: float = 0.8


DEFAULT_LAYER_RULES: RuleList = (
    (".*/(attn|mlp|moe)/.*", "sparse"),  # attention, MLP and expert projections
    (".*", "dense"),  # LM head (embeddings and norms are not linear layers: always dense)
)


@dataclasses.dataclass(frozen=True)
class SparsityConfig:
    method: Literal["none", "static", "oneshot", "gmp", "set", "rigl", "ste", "srste", "mdgf",
                    "sdgf", "ast", "spdf"] = "none"
    sparsity: float = 0.5
    pattern: Literal["unstructured", "nm", "block"] = "unstructured"
    n: int = 2
    m: int = 4
    block: int = 32
    # block pattern: 'auto' runs the Pallas block-sparse kernels on GPU (all three products
    # skip pruned tiles: 'mosaic_stream' on Hopper at block 128 in bf16, else 'pallas') and their
    # plain-jnp reference elsewhere; 'none' simulates the mask
    # in dense matmuls (MaskedLinear); 'xla' / 'pallas' (Triton lowering) / 'interpret' /
    # 'mosaic' (Mosaic GPU, Hopper, bf16, blocks 64/128) / 'mosaic_interpret' force one;
    # 'mosaic_fwd' runs the forward on Mosaic GPU and both gradients on the Triton kernels;
    # 'mosaic_ws' the warp-specialized Mosaic forward and input grad, Triton weight grad;
    # 'mosaic_stream' the same with one TMA ring through all of a program's tiles
    kernel: Literal["auto", "none", "xla", "pallas", "interpret", "mosaic",
                    "mosaic_interpret", "mosaic_fwd", "mosaic_ws", "mosaic_stream"] = "auto"
    distribution: Literal["uniform", "erk"] = "uniform"
    # layer name -> 'sparse' (density from the distribution), 'dense', or an explicit density
    rules: RuleList = DEFAULT_LAYER_RULES
    oneshot: OneShotConfig = OneShotConfig()
    gmp: GradualConfig = GradualConfig()
    set: DynamicConfig = DynamicConfig()
    rigl: DynamicConfig = DynamicConfig()
    ste: STEConfig = STEConfig()
    spdf: SPDFConfig = SPDFConfig()

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def density(self) -> float:
        return 1.0 - self.sparsity

    def validate(self) -> None:
        if not self.enabled:
            return
        if not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"sparsity.sparsity must lie in [0, 1), got {self.sparsity}")
        if self.pattern == "nm" or self.method == "sdgf":
            if not 0 < self.n < self.m:
                raise ConfigError(f"sparsity.n:m must satisfy 0 < n < m, got {self.n}:{self.m}")
            if abs(self.sparsity - (1 - self.n / self.m)) > 1e-9:
                raise ConfigError(
                    f"sparsity.sparsity ({self.sparsity}) disagrees with sparsity.n:m = "
                    f"{self.n}:{self.m} (sparsity {1 - self.n / self.m:g}); set them consistently")
        if self.pattern == "nm" and self.distribution != "uniform":
            raise ConfigError("sparsity.distribution must be 'uniform' with pattern 'nm' (every "
                              "N:M layer has density n/m)")
        if self.pattern == "block" and self.block not in (16, 32, 64, 128):
            raise ConfigError(f"sparsity.block must be 16, 32, 64 or 128, got {self.block}")
        if self.method == "sdgf" and self.pattern != "nm":
            raise ConfigError("sparsity.method 'sdgf' (N:M structure decay) needs "
                              "sparsity.pattern=nm")
        if self.method in STE_METHODS and self.pattern == "block":
            raise ConfigError(f"sparsity.method '{self.method}' recomputes masks every step; use "
                              f"pattern nm or unstructured (block masks: static, oneshot, gmp, "
                              f"set, rigl, spdf)")
        if self.method in ("set", "rigl", "gmp") and self.pattern == "nm":
            raise ConfigError(f"sparsity.method '{self.method}' changes per-layer counts freely; "
                              f"N:M needs one of ste, srste, mdgf, sdgf, ast, static, oneshot")
        for name, section in (("gmp", self.gmp),):
            if not 0 <= section.start_fraction < section.end_fraction <= 1:
                raise ConfigError(f"sparsity.{name}: need 0 <= start_fraction < end_fraction <= 1")
        for name in ("gmp", "set", "rigl", "ste"):
            if getattr(self, name).update_every < 1:
                raise ConfigError(f"sparsity.{name}.update_every must be >= 1")
        for name in ("set", "rigl"):
            section = getattr(self, name)
            if not 0 < section.drop_fraction < 1 or not 0 < section.end_fraction <= 1:
                raise ConfigError(f"sparsity.{name}: drop_fraction in (0, 1) and end_fraction in "
                                  f"(0, 1] required")
        if not 0 <= self.oneshot.at_fraction <= 1 or not 0 <= self.spdf.dense_at_fraction <= 1:
            raise ConfigError("sparsity.oneshot.at_fraction and sparsity.spdf.dense_at_fraction "
                              "must lie in [0, 1]")
        ste = self.ste
        if ste.dense_fraction + ste.fine_tune_fraction >= 1 or min(ste.dense_fraction,
                                                                   ste.fine_tune_fraction) < 0:
            raise ConfigError("sparsity.ste: dense_fraction + fine_tune_fraction must lie in "
                              "[0, 1)")
