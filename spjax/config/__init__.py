"""The run configuration: typed, frozen section dataclasses, loaded from YAML and overrides.

    run.py                  Config (the whole run) and the data, optimizer, train and parallel
                            sections
    model.py                the model section: architecture, MoE, attention patterns and gate
    sparsity.py, lowrank.py the sparsity and low-rank sections, one sub-section per method
    attention_patterns.py   what the attention pattern kinds mean: their block masks (numpy)
    checks.py               checks that involve more than one section
    loading.py              YAML + dotted overrides -> Config; presets; strict coercion

This package imports nothing of spjax but errors.py and rules.py: every other package reads
its config from here.
"""

from spjax.config import attention_patterns
from spjax.config.loading import (CONFIGS_DIR, PRESET_DIRS, from_dict, load_config,
                                  model_preset, section_preset, to_dict)
from spjax.config.lowrank import LowRankConfig
from spjax.config.model import (LEARNED, AttentionGateConfig, AttentionPatternConfig,
                                ModelConfig, MoEConfig, RuleList)
from spjax.config.run import (DEFAULT_SHARDING_RULES, Config, DataConfig, OptimizerConfig,
                              ParallelConfig, TrainConfig)
from spjax.config.sparsity import SparsityConfig

__all__ = ["CONFIGS_DIR", "DEFAULT_SHARDING_RULES", "LEARNED", "PRESET_DIRS",
           "AttentionGateConfig", "AttentionPatternConfig", "Config", "DataConfig",
           "LowRankConfig", "ModelConfig", "MoEConfig", "OptimizerConfig", "ParallelConfig",
           "RuleList", "SparsityConfig", "TrainConfig", "attention_patterns", "from_dict",
           "load_config", "model_preset", "section_preset", "to_dict"]
