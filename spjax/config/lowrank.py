"""The `lowrank:` config section: low-rank and sparse-plus-low-rank structures (model side)
and low-rank optimizer-side methods.

    lowrank:
      method: sltrain        # none | lowrank | sltrain | lost | sst | relora | galore
      rank: 0                # 0: the SLTrain/GaLore scripts' rank for the model preset
      alpha: 0               # 0: the SLTrain scripts' alpha for the preset
      density: 0.03          # SLTrain's delta (random support); LOST's kept channel fraction
      rules: [[".*/(attn|mlp)/.*", lowrank], [".*", dense]]
      refactor: {every: 0}   # weight refactorization of lowrank/sltrain factors; 0 = off

Structures replace the weight of the layers the rules mark `lowrank`:
  lowrank  W = (alpha/r) A B                      sltrain  W = (alpha/r) A B + S (random support)
  lost     SVD init: top-r factors + channel-wise sparse complement
  sst      W = U diag(s) V, r pairs trained per step     relora   W = W0 (frozen) + (alpha/r) A B
`galore` keeps dense weights and projects their gradients (an optax transformation).
Rules may also mark MoE expert stacks (`layers/0/moe/gate`, ...) for lowrank, sltrain or
relora: one factorization per expert (model/experts_lowrank.py); the default rules leave
experts dense.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from spjax.errors import ConfigError
from spjax.rules import RuleList


STRUCTURE_METHODS = ("lowrank", "sltrain", "lost", "sst", "relora")

# (rank, alpha) of the SLTrain scripts (scripts/llm_pretrain/*.sh); GaLore uses the same ranks.
PRESET_RANKS = {"60m": (128, 32.0), "130m": (256, 16.0), "350m": (256, 16.0), "1b": (512, 8.0)}


@dataclasses.dataclass(frozen=True)
class GaLoreConfig:
    """GaLore (Zhao et al. 2024): SVD projector refreshed every `update_every` steps, Adam in
    the projected space, update scaled by `scale` (paper: lr 0.01, scale 0.25, T 200)."""

    update_every: int = 200
    scale: float = 0.25


@dataclasses.dataclass(frozen=True)
class ReLoRAConfig:
    """ReLoRA: every `merge_every` steps merge (alpha/r) A B into the frozen W0, re-initialize
    A and B, zero their optimizer moments, and re-warm the learning rate over
    `rewarm_steps` (the jagged schedule)."""

    merge_every: int = 5000
    rewarm_steps: int = 100


@dataclasses.dataclass(frozen=True)
class RefactorConfig:
    """Weight refactorization (Glentis et al. 2025): every `every` steps, A <- U sqrt(S),
    B <- sqrt(S) V^T from the SVD of A B, moments zeroed, learning rate re-warmed over
    `rewarm_steps`. 0 disables it."""

    every: int = 0
    rewarm_steps: int = 20


@dataclasses.dataclass(frozen=True)
class SSTConfig:
    """Sparse spectral training: r singular-vector pairs resampled every `resample_every` steps
    with p_i = 1/2 (1/m + s_i / sum s); re-orthogonalized by SVD every `reorth_every`."""

    resample_every: int = 1
    reorth_every: int = 1000


DEFAULT_LOWRANK_RULES: RuleList = (
    (".*/(attn|mlp)/.*", "lowrank"),  # attention and MLP projections (GaLore protocol targets)
    (".*", "dense"),  # LM head stays dense and full-rank
)


@dataclasses.dataclass(frozen=True)
class LowRankConfig:
    method: Literal["none", "lowrank", "sltrain", "lost", "sst", "relora", "galore"] = "none"
    rank: int = 0
    alpha: float = 0.0
    density: float = 0.03
    rules: RuleList = DEFAULT_LOWRANK_RULES
    galore: GaLoreConfig = GaLoreConfig()
    relora: ReLoRAConfig = ReLoRAConfig()
    refactor: RefactorConfig = RefactorConfig()
    sst: SSTConfig = SSTConfig()

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def is_structure(self) -> bool:
        return self.method in STRUCTURE_METHODS

    def resolved_rank_alpha(self, model_name: str, d_model: int) -> tuple[int, float]:
        """(r, alpha): explicit values, else the preset's scripts, else r = d_model/4 and
        alpha = r/4 (the 60M preset's ratio)."""
        rank, alpha = PRESET_RANKS.get(model_name, (max(1, d_model // 4), 0.0))
        rank = self.rank or rank
        alpha = self.alpha or alpha or rank / 4
        return rank, alpha

    def validate(self) -> None:
        if not self.enabled:
            if self.refactor.every:
                raise ConfigError("lowrank.refactor.every needs lowrank.method lowrank or sltrain")
            return
        if self.rank < 0:
            raise ConfigError(f"lowrank.rank must be >= 1 (0: preset default), got {self.rank}")
        if self.alpha < 0:
            raise ConfigError(f"lowrank.alpha must be > 0 (0: preset default), got {self.alpha}")
        if self.method in ("sltrain", "lost") and not 0.0 < self.density < 1.0:
            raise ConfigError(f"lowrank.density must lie in (0, 1) for {self.method}, got "
                              f"{self.density}")
        if self.refactor.every < 0 or (self.refactor.every and
                                       self.method not in ("lowrank", "sltrain")):
            raise ConfigError("lowrank.refactor.every applies to lowrank.method lowrank or "
                              "sltrain (factors A, B); set it to 0 for "
                              f"'{self.method}'")
        for key, value in (("galore.update_every", self.galore.update_every),
                           ("relora.merge_every", self.relora.merge_every),
                           ("sst.resample_every", self.sst.resample_every),
                           ("sst.reorth_every", self.sst.reorth_every)):
            if value < 1:
                raise ConfigError(f"lowrank.{key} must be >= 1, got {value}")
        for key, value in (("relora.rewarm_steps", self.relora.rewarm_steps),
                           ("refactor.rewarm_steps", self.refactor.rewarm_steps)):
            if value < 0:
                raise ConfigError(f"lowrank.{key} must be >= 0, got {value}")
        for i, rule in enumerate(self.rules):
            if len(rule) != 2 or rule[1] not in ("lowrank", "dense"):
                raise ConfigError(f"lowrank.rules[{i}] must be [regex, 'lowrank' | 'dense'], "
                                  f"got {rule!r}")
