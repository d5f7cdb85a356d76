"""Evaluation: bits per byte (byte and BPE tokenizers), split loss, continuation scoring and
rolling windows, checked against direct numpy computations on fresh random models."""

import math
import sysconfig
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from spjax.data import load_tokenizer, prepare_dataset
from spjax.data.pipeline import TokenWindows
from spjax.data.tokenizer import ByteTokenizer, train_bpe
from spjax.evaluation.bytes import token_byte_lengths
from spjax.evaluation.perplexity import evaluate_split, row_losses
from spjax.evaluation.scoring import ContinuationScorer, rolling_windows

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TEXTS = ["héllo wörld, ünïcode ✓ and ascii " * 20, "def f(x):\n    return x + 1\n" * 20,
         "日本語のテキストも少し " * 10]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "ds"
    prepare_dataset([str(STDLIB / "json")], out, val_fraction=0.2, progress=False)
    return out


def test_byte_lengths_sum_to_the_utf8_length_of_the_text():
    for tokenizer in (ByteTokenizer(), train_bpe(TEXTS, 320)):
        lengths = token_byte_lengths(tokenizer)
        assert lengths[tokenizer.eos_id] == 0
        for text in [*TEXTS, "text the BPE never saw: ∑ ≠ ∞, naïve café"]:
            ids = tokenizer.encode(text)
            assert lengths[ids].sum() == len(text.encode("utf-8")), (tokenizer.name, text)


def _bigram(vocab: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 2, (vocab, vocab)).astype(np.float32)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - x.max(-1, keepdims=True)


def test_split_loss_and_bits_per_byte_equal_a_direct_computation(dataset):
    tokenizer = load_tokenizer(dataset)
    table = _bigram(tokenizer.vocab_size, 1)  # logits of the next token given this one
    result = evaluate_split(row_losses(lambda t: jnp.asarray(table)[t]), dataset, tokenizer,
                            seq_len=32, batch_size=3, progress=False)
    windows = TokenWindows(dataset, "val", 32)
    logprobs = _log_softmax(table)
    nats = sum(-logprobs[w["inputs"], w["targets"]].sum()
               for w in (windows[i] for i in range(len(windows))))
    targets = np.concatenate([windows[i]["targets"] for i in range(len(windows))])
    n_bytes = int((targets < 256).sum())  # byte tokenizer: 1 byte per id, 0 for EOS
    assert result.tokens == len(windows) * 32 == targets.size
    assert result.bytes == n_bytes
    assert result.loss == pytest.approx(nats / targets.size, rel=1e-5)
    assert result.bits_per_byte == pytest.approx(nats / (math.log(2) * n_bytes), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.loss), rel=1e-9)


def test_continuation_scores_and_greedy_flags(dataset):
    vocab = 50
    table = _bigram(vocab, 2)
    logprobs = _log_softmax(table)
    scorer = ContinuationScorer(lambda t: jnp.asarray(table)[t], max_len=16, batch_size=4)
    rng = np.random.default_rng(3)
    requests = [(list(rng.integers(0, vocab, rng.integers(1, 12))),
                 list(rng.integers(0, vocab, rng.integers(1, 8)))) for _ in range(11)]
    greedy_path = [7]
    for _ in range(5):
        greedy_path.append(int(np.argmax(table[greedy_path[-1]])))
    requests.append((greedy_path[:1], greedy_path[1:]))  # what greedy decoding produces
    for (context, continuation), (score, greedy) in zip(requests, scorer.score(requests)):
        whole = [*context, *continuation][-17:]
        scored = list(zip(whole[:-1], whole[1:]))[-len(continuation):]
        expected = sum(logprobs[a, b] for a, b in scored)
        assert score == pytest.approx(expected, rel=1e-5, abs=1e-4)
        picks = [int(np.argmax(table[a])) == b for a, b in scored]
        assert greedy == all(picks)
    assert scorer.score(requests[-1:])[0][1] is True


def test_rolling_windows_predict_every_token_once_within_the_context_limit():
    tokens = list(range(100, 137))
    for max_len in (1, 5, 16, 64):
        windows = rolling_windows(tokens, prefix_id=0, max_len=max_len)
        predicted = [t for _, continuation in windows for t in continuation]
        assert predicted == tokens
        for context, continuation in windows:
            assert len(context) + len(continuation) - 1 <= max_len
            full = [0, *tokens]
            start = tokens.index(continuation[0]) + 1  # position in `full`
            assert full[start - len(context):start] == list(context)
