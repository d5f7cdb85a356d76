"""How many bytes of text each token id stands for, so that bits per byte compares models
whose tokenizers differ (a byte model against a BPE model).

bits per byte = (summed cross-entropy in nats) / (ln 2 x UTF-8 bytes of the predicted text).
The end-of-sequence token stands for no text: 0 bytes (its loss still counts, as every
stack that reports bits per byte on packed documents does).
"""

from __future__ import annotations

import numpy as np

from spjax.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer
from spjax.errors import DataError


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """int64 [vocab_size]: the UTF-8 byte length of each token id's text."""
    if isinstance(tokenizer, ByteTokenizer):
        lengths = np.zeros(tokenizer.vocab_size, np.int64)
        lengths[:256] = 1
        return lengths
    if isinstance(tokenizer, HFTokenizer):
        return _hf_byte_lengths(tokenizer)
    raise DataError(f"tokenizer {tokenizer.name!r}: no byte lengths known for its kind; bits "
                    f"per byte needs the byte or a HF tokenizer")


def _hf_byte_lengths(tokenizer: HFTokenizer) -> np.ndarray:
    """Byte-level BPE (GPT-2 style, what `spjax prepare-data --tokenizer bpe` trains): each
    character of a token's string is one byte under the ByteLevel alphabet. Other models
    (SentencePiece-style '▁' for a space, '<0xNN>' byte fallback) are read token by token.
    Special tokens (EOS and other added tokens) stand for no text."""
    from tokenizers import decoders, pre_tokenizers

    inner = tokenizer._tok  # the tokenizers.Tokenizer
    vocab = inner.get_vocab(with_added_tokens=False)
    specials = {t.content for t in inner.get_added_tokens_decoder().values() if t.special}
    byte_level = isinstance(inner.decoder, decoders.ByteLevel)
    alphabet = set(pre_tokenizers.ByteLevel.alphabet()) if byte_level else set()
    lengths = np.zeros(tokenizer.vocab_size, np.int64)
    for token, token_id in vocab.items():
        if token in specials:
            continue
        if byte_level and set(token) <= alphabet:
            lengths[token_id] = len(token)
        elif token.startswith("<0x") and token.endswith(">") and len(token) == 6:
            lengths[token_id] = 1  # SentencePiece byte fallback
        else:
            lengths[token_id] = len(token.replace("\u2581", " ").encode("utf-8"))
    return lengths
