"""Tokenizers: UTF-8 bytes, any HF `tokenizer.json`, and a locally trained byte-level BPE.

Every tokenizer has exactly one end-of-sequence id. `prepare` appends it after each
document, so packed windows show the model where one document ends and the next begins.
`encode` returns an int32 numpy array and never adds BOS/EOS itself; `decode` drops the
EOS token so `decode(encode(text)) == text` for any text.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from spjax.errors import DataError

# Names a `tokenizer.json` may already use for its end-of-text token, most common first.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eos|>", "[SEP]")
# The token added when a tokenizer has none of the above (and the one `train_bpe` uses).
DEFAULT_EOS = "<|endoftext|>"


@runtime_checkable
class Tokenizer(Protocol):
    name: str
    vocab_size: int  # embedding rows needed: max token id + 1
    eos_id: int

    def encode(self, text: str) -> np.ndarray: ...

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def describe(self) -> dict[str, Any]:
        """What meta.json records so `load_tokenizer` can rebuild this tokenizer."""
        ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; EOS is 256. No training, no files, no unknown tokens."""

    name = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> np.ndarray:
        # Vectorized: one C-level copy per document instead of a Python loop per byte.
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids)
        arr = arr[(arr >= 0) & (arr < 256)].astype(np.uint8)
        return arr.tobytes().decode("utf-8", errors="replace")

    def describe(self) -> dict[str, Any]:
        return {"kind": "byte", "name": self.name}


class HFTokenizer:
    """Wraps a HF `tokenizers.Tokenizer`.

    EOS is the first of `EOS_CANDIDATES` present in the vocabulary; if none is, `DEFAULT_EOS`
    is added as a special token (its id is the next free one). The dataset stores the
    tokenizer *after* that addition, so ids never shift between prepare and training.
    """

    def __init__(self, tok: Any, name: str):
        from tokenizers import AddedToken

        self._tok = tok
        self.name = name
        for cand in EOS_CANDIDATES:
            if tok.token_to_id(cand) is not None:
                self.eos_token = cand
                break
        else:
            tok.add_special_tokens([AddedToken(DEFAULT_EOS, special=True, normalized=False)])
            self.eos_token = DEFAULT_EOS
        self.eos_id = int(tok.token_to_id(self.eos_token))
        # Added tokens can sit above `get_vocab_size()`; the embedding needs max id + 1.
        self.vocab_size = int(max(tok.get_vocab(with_added_tokens=True).values())) + 1

    @classmethod
    def from_file(cls, path: str | Path) -> HFTokenizer:
        from tokenizers import Tokenizer as _Tok

        p = Path(path)
        if not p.is_file():
            what = "a directory, not a tokenizer file" if p.is_dir() else "tokenizer file not found"
            raise DataError(f"{p}: {what}; pass a HF tokenizer.json, 'byte' or 'bpe'")
        try:
            tok = _Tok.from_file(str(p))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"{p}: not a valid HF tokenizer.json ({first}); pass a tokenizer.json saved by `tokenizers`") from None
        return cls(tok, name=p.name)

    def encode(self, text: str) -> np.ndarray:
        # add_special_tokens=False: no BOS from a post-processor; prepare adds EOS itself.
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, np.int32) for e in encs]

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids if int(i) != self.eos_id]
        return self._tok.decode(ids, skip_special_tokens=False)

    def save(self, path: str | Path) -> None:
        self._tok.save(str(path))

    def describe(self) -> dict[str, Any]:
        return {"kind": "hf", "name": self.name, "file": "tokenizer.json", "eos_token": self.eos_token}


def train_bpe(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    """Trains a byte-level BPE (GPT-2 style: every byte is a base token, so no unknowns)."""
    from tokenizers import Tokenizer as _Tok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    base = len(pre_tokenizers.ByteLevel.alphabet()) + 1  # 256 bytes + EOS
    if vocab_size < base or vocab_size > 2**32 - 1:
        raise DataError(f"bpe vocab size {vocab_size} is out of range; use a value in [{base}, 4294967295]")
    tok = _Tok(models.BPE())
    # add_prefix_space=False keeps decode(encode(x)) == x exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[DEFAULT_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(tok, name=f"bpe-{vocab_size}")


def tokenizer_from_meta(desc: dict[str, Any], dataset_dir: Path) -> Tokenizer:
    if desc.get("kind") == "byte":
        return ByteTokenizer()
    if desc.get("kind") == "hf":
        tok = HFTokenizer.from_file(dataset_dir / desc.get("file", "tokenizer.json"))
        tok.name = desc.get("name", tok.name)
        return tok
    raise DataError(f"{dataset_dir / 'meta.json'}: unknown tokenizer kind {desc.get('kind')!r}; re-run `spjax prepare-data`")
