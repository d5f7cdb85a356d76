"""train.deterministic: bit-identical runs on one GPU.

What breaks determinism on a GPU, and what this mode does about each:

- XLA picks atomics-based scatters (the embedding gradient, MoE combine), non-deterministic
  cuBLAS/cuDNN algorithms (the cuDNN attention backward adds dQ with atomics) and autotunes
  kernels per compile, so two compiles may pick different kernels. XLA's
  `--xla_gpu_exclude_nondeterministic_ops=true` switches all of these to deterministic
  implementations and takes the first (default) configuration instead of autotuning. It must
  be in XLA_FLAGS before the backend starts: `configure` puts it there, or refuses with a
  one-line error when JAX is already running without it.
  `--xla_gpu_deterministic_ops=true`, the flag JAX's documentation names, also disables
  autotuning, and gives wrong scatter results in jax-ml/jax#27796.
  Measured on an H100 (jax 0.11.2, 2026-12-07): with either flag the 60M train step dies at
  its first execution inside `execute_sharded` (IndexError raw_hash_map::at), the crash
  issue 22 reported. Which op's deterministic path fails is not yet known (the cuDNN
  attention backward, forced deterministic by both flags, is the first suspect;
  bench/determinism_probe.py runs each part twice under a flag set and names the one).
  Until it is found and routed around, `check_backend` refuses the mode on GPUs with a
  one-line error instead of that crash.
- The fused block-sparse attention backward adds dQ by TMA reduce-add from several programs
  in arrival order; `deterministic_config` switches to the two-kernel backward, which has no
  cross-program reduction.

CPU runs are deterministic either way; none of this changes them.
"""

from __future__ import annotations

import dataclasses
import os

from spjax.config import Config
from spjax.errors import ConfigError

XLA_FLAG = "--xla_gpu_exclude_nondeterministic_ops=true"


def flag_set() -> bool:
    return XLA_FLAG in os.environ.get("XLA_FLAGS", "").split()


def configure(enabled: bool) -> None:
    if not enabled or flag_set():
        return
    from jax._src import xla_bridge  # no public way to ask whether backends exist yet

    if xla_bridge.backends_are_initialized():
        raise ConfigError(f"train.deterministic=true needs XLA_FLAGS={XLA_FLAG} before JAX "
                          f"starts, and JAX is already running in this process; start it "
                          f"through `spjax train`, or export XLA_FLAGS={XLA_FLAG}")
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {XLA_FLAG}".strip()


def check_backend(enabled: bool, backend: str) -> None:
    """The mode on a GPU crashes today (see the module doc): say so instead."""
    if enabled and backend == "gpu":
        raise ConfigError("train.deterministic=true does not run on GPUs yet: XLA's "
                          "deterministic kernels crash the first step on jax 0.11.2 (issue "
                          "22); set train.deterministic=false (CPU runs are deterministic "
                          "either way)")


def deterministic_config(config: Config) -> Config:
    """`config` with the kernel variants that reduce in arrival order replaced."""
    if not config.train.deterministic:
        return config
    pattern = dataclasses.replace(config.model.attention_pattern, fused_backward=False)
    return dataclasses.replace(config, model=dataclasses.replace(config.model,
                                                                 attention_pattern=pattern))
