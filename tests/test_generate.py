"""Generation: greedy KV-cache decoding equals step-by-step argmax of full-sequence logits
for every structure (dense, GQA, MoE, sparse attention patterns, masked, N:M, low-rank);
EOS stops a sequence; sampling keeps to top-k / top-p."""

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spjax.config import load_config
from spjax.errors import ConfigError
from spjax.generate.generator import Generator
from spjax.generate.sampling import Sampling, next_tokens
from spjax.train.state import Program, init_state, state_layout
from spjax import parallel

BASE = ["model=tiny", "model.d_model=64", "model.d_ff=128", "model.n_heads=4",
        "model.n_layers=2", "model.vocab_size=128", "model.compute_dtype=float32",
        "model.init_std=0.3", "parallel.data=1"]
VARIANTS = {
    "dense": [],
    "gqa": ["model.n_kv_heads=2"],
    "moe": ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.d_expert=32"],
    "sliding_window": ["model.attention_pattern.block=16", "model.attention_pattern.window=16",
                       "model.attention_pattern.global_tokens=16",
                       '"model.attention_pattern.rules=[[layers/0/attn, global_local], '
                       '[.*, sliding_window]]"'],
    "masked_90": ["sparsity.method=static", "sparsity.sparsity=0.9"],
    "nm_2of4": ["sparsity.method=ste", "sparsity.pattern=nm", "sparsity.n=2", "sparsity.m=4"],
    "sltrain": ["lowrank.method=sltrain", "lowrank.rank=8"],
}


@dataclass
class Tok:
    """A stand-in tokenizer: ids are the text's characters' code points mod 100."""
    eos_id: int = 127
    vocab_size: int = 128

    def encode(self, text: str) -> np.ndarray:
        return np.asarray([ord(c) % 100 for c in text], np.int32)

    def decode(self, ids) -> str:
        return "".join(chr(65 + int(i) % 26) for i in ids)


def _model(variant: str):
    overrides = [o.strip('"') for o in BASE + VARIANTS[variant]]
    config = load_config(None, overrides)
    program = Program.build(config)
    mesh = parallel.make_mesh(config.parallel, jax.devices()[:1])
    layout = state_layout(program, mesh, parallel.sharding_rules(config.parallel))
    state = init_state(program, layout, seed=0)
    return program.model_def, state.params, state.structure


def _greedy_reference(model, prompt: np.ndarray, steps: int, length: int = 64) -> list[int]:
    """Each next token from a full forward over the sequence so far, right-padded to one
    length (a multiple of the attention block; causal, so the padding changes nothing)."""
    tokens = list(prompt)
    forward = jax.jit(lambda t: model(t)[0])
    for _ in range(steps):
        padded = np.zeros((1, length), np.int32)
        padded[0, :len(tokens)] = tokens
        tokens.append(int(jnp.argmax(forward(jnp.asarray(padded))[len(tokens) - 1])))
    return tokens[len(prompt):]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_decoding_equals_argmax_of_full_sequence_logits(variant):
    model_def, params, structure = _model(variant)
    model = model_def.merge(params, structure)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 100, n).astype(np.int32) for n in (3, 11, 20)]
    generator = Generator(model_def, params, structure, Tok(eos_id=-1))  # no EOS: full budget
    new, prefill_s, decode_s = generator.generate_ids(prompts, max_new_tokens=12)
    for prompt, generated in zip(prompts, new):
        assert list(generated) == _greedy_reference(model, prompt, 12), variant
    assert prefill_s > 0 and decode_s > 0


def test_eos_stops_each_sequence_where_it_is_produced():
    model_def, params, structure = _model("dense")
    model = model_def.merge(params, structure)
    prompts = [np.asarray([5, 6, 7], np.int32), np.asarray([9, 1], np.int32)]
    reference = [_greedy_reference(model, p, 10) for p in prompts]
    eos = reference[0][4]  # what the first sequence emits at its fifth new token
    generator = Generator(model_def, params, structure, Tok(eos_id=eos))
    new, _, _ = generator.generate_ids(prompts, max_new_tokens=10)
    for generated, ref in zip(new, reference):
        stop = ref.index(eos) if eos in ref else len(ref)
        assert list(generated) == ref[:stop]
    assert len(new[0]) == reference[0].index(eos) <= 4


def test_generate_text_api_and_bad_arguments():
    model_def, params, structure = _model("dense")
    generator = Generator(model_def, params, structure, Tok(eos_id=-1))
    result = generator.generate(["hello", "a longer prompt"], max_new_tokens=5)
    assert [len(t) for t in result.new_tokens] == [5, 5]
    assert all(len(c) == 5 for c in result.completions)
    assert result.generated == 10 and result.decode_tokens_per_s > 0
    with pytest.raises(ConfigError, match="--max-new-tokens"):
        generator.generate(["x"], max_new_tokens=0)
    with pytest.raises(ConfigError, match="--top-p"):
        generator.generate(["x"], sampling=Sampling(temperature=1.0, top_p=0.0))


def test_sampling_keeps_to_top_k_and_top_p():
    logits = jnp.asarray(np.random.default_rng(0).normal(0, 1, (4000, 10)), jnp.float32)
    keys = jax.random.key(0)
    greedy = np.asarray(jnp.argmax(logits, axis=-1))
    assert (np.asarray(next_tokens(logits, keys, Sampling())) == greedy).all()
    assert (np.asarray(next_tokens(logits, keys, Sampling(1.0, top_k=1))) == greedy).all()
    assert (np.asarray(next_tokens(logits, keys, Sampling(1.0, top_p=1e-6))) == greedy).all()
    top3 = np.argsort(-np.asarray(logits), axis=-1)[:, :3]
    picked = np.asarray(next_tokens(logits, keys, Sampling(1.0, top_k=3)))
    assert all(p in row for p, row in zip(picked, top3))
    # top-p: only tokens inside the smallest set reaching p; over 4000 rows all 3 ranks seen
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    picked = np.asarray(next_tokens(logits, keys, Sampling(1.0, top_p=0.5)))
    for row, p in zip(probs, picked):
        order = np.argsort(-row)
        mass_before = np.cumsum(row[order]) - row[order]
        assert p in order[mass_before < 0.5]
    # temperature: plain sampling follows the softmax (chi-square-free check on one row)
    row = jnp.tile(jnp.asarray([[0.0, 1.0, 2.0]]), (20000, 1))
    counts = np.bincount(np.asarray(next_tokens(row, keys, Sampling(1.0))), minlength=3)
    expected = np.asarray(jax.nn.softmax(jnp.asarray([0.0, 1.0, 2.0]))) * 20000
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected))
