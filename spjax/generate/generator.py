"""Batched text generation: a jitted prefill, then a jitted decode loop (`lax.while_loop`
over KV-cache decode steps) that stops when every sequence has emitted EOS or the token
budget is spent.

    generator = Generator(model_def, params, structure, tokenizer)
    result = generator.generate(["def main(", "The"], max_new_tokens=64)
    result.completions, result.decode_tokens_per_s

Each prompt is encoded after the end-of-text token (`prefix_ids`), which is how documents
start in spjax's packed training data. Shapes are padded to a few sizes (the prompt length
to a multiple of 16 or of the attention block, the cache to that plus the budget), so a
session of prompts compiles a handful of programs.
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spjax.data.tokenizer import Tokenizer
from spjax.errors import ConfigError
from spjax.generate.decode import KVCache, decode_step, prefill
from spjax.generate.sampling import Sampling, next_tokens
from spjax.train.state import ModelDef


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    prompts: list[str]
    completions: list[str]  # decoded new text, EOS and what follows it dropped
    new_tokens: list[np.ndarray]  # generated ids per prompt, up to and without EOS
    prefill_s: float
    decode_s: float

    @property
    def generated(self) -> int:
        return sum(len(t) for t in self.new_tokens)

    @property
    def decode_tokens_per_s(self) -> float:
        """Generated tokens (all sequences) per second of the decode loop."""
        return self.generated / self.decode_s if self.decode_s > 0 else float("nan")


class Generator:
    def __init__(self, model_def: ModelDef, params: Any, structure: Any, tokenizer: Tokenizer,
                 min_capacity: int = 0, prefix_ids: Sequence[int] | None = None):
        """`min_capacity`: the smallest cache to build (a run's data.seq_len, so that static
        attention patterns see the sequence length they were validated for)."""
        self.model_def, self.params, self.structure = model_def, params, structure
        self.tokenizer = tokenizer
        self.prefix_ids = list(prefix_ids) if prefix_ids is not None else [tokenizer.eos_id]
        section = model_def.config.attention_pattern
        patterns = set(section.patterns(model_def.config.n_layers).values())
        self.align = section.block if patterns - {"dense"} else 16
        self.min_capacity = _round_up(min_capacity, self.align) if min_capacity else 0
        if "file" in patterns:
            raise ConfigError("spjax generate: a 'file' attention pattern fixes the sequence "
                              "length; generation supports the computed patterns only")
        # jitted once per generator (the model's graph is closed over, not hashed)
        self._prefill = jax.jit(partial(_prefill, model_def), static_argnums=4)
        self._decode_loop = jax.jit(partial(_decode_loop, model_def), static_argnums=(0, 1))

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 64,
                 sampling: Sampling = Sampling(), seed: int = 0) -> GenerationResult:
        ids = [np.asarray([*self.prefix_ids, *self.tokenizer.encode(p)], np.int32)
               for p in prompts]
        new, prefill_s, decode_s = self.generate_ids(ids, max_new_tokens, sampling, seed)
        return GenerationResult(list(prompts), [self.tokenizer.decode(t) for t in new], new,
                                prefill_s, decode_s)

    def generate_ids(self, prompts: Sequence[np.ndarray], max_new_tokens: int,
                     sampling: Sampling = Sampling(), seed: int = 0
                     ) -> tuple[list[np.ndarray], float, float]:
        """(generated ids per prompt, without EOS and after it; prefill and decode seconds)."""
        sampling.validate()
        if max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ConfigError("spjax generate: every prompt needs at least one token")
        lengths = np.asarray([len(p) for p in prompts], np.int32)
        t = _round_up(int(lengths.max()), self.align)
        capacity = max(_round_up(t + max_new_tokens, self.align), self.min_capacity)
        tokens = np.zeros((len(prompts), t), np.int32)
        for row, p in enumerate(prompts):
            tokens[row, :len(p)] = p
        start = time.time()
        logits, cache = jax.block_until_ready(
            self._prefill(self.params, self.structure, tokens, lengths, capacity))
        prefill_s = time.time() - start
        start = time.time()
        out = jax.device_get(self._decode_loop(sampling, max_new_tokens, self.params,
                                               self.structure, logits, cache,
                                               jax.random.key(seed), self.tokenizer.eos_id))
        decode_s = time.time() - start
        return [_until_eos(row, self.tokenizer.eos_id) for row in out], prefill_s, decode_s


def _prefill(model_def: ModelDef, params: Any, structure: Any, tokens: jax.Array,
             lengths: jax.Array, capacity: int) -> tuple[jax.Array, KVCache]:
    return prefill(model_def.merge(params, structure), tokens, lengths, capacity)


def _decode_loop(model_def: ModelDef, sampling: Sampling, max_new_tokens: int, params: Any,
                 structure: Any, logits: jax.Array, cache: KVCache, key: jax.Array,
                 eos_id: int) -> jax.Array:
    """int32 [B, max_new_tokens]: the first token from the prefill's logits, then one
    decode step per token; a finished row repeats EOS."""
    model = model_def.merge(params, structure)
    key, first_key = jax.random.split(key)
    first = next_tokens(logits, first_key, sampling)
    out = jnp.full((first.shape[0], max_new_tokens), eos_id, jnp.int32).at[:, 0].set(first)

    def running(carry: tuple) -> jax.Array:
        _, _, _, step, done, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def one_token(carry: tuple) -> tuple:
        cache, last, out, step, done, key = carry
        logits, cache = decode_step(model, cache, last)
        key, step_key = jax.random.split(key)
        token = jnp.where(done, eos_id, next_tokens(logits, step_key, sampling))
        return cache, token, out.at[:, step].set(token), step + 1, done | (token == eos_id), key

    carry = (cache, first, out, jnp.int32(1), first == eos_id, key)
    return jax.lax.while_loop(running, one_token, carry)[2]


def _until_eos(row: np.ndarray, eos_id: int) -> np.ndarray:
    stops = np.nonzero(row == eos_id)[0]
    return row[:stops[0]] if stops.size else row


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
