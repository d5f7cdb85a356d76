"""Data: tokenizers, text -> token shards (`prepare_dataset`), grain pipelines over them.

    prepare_dataset(["corpus/"], "data/mycorpus", tokenizer="bpe")
    it = train_iterator("data/mycorpus", seq_len=1024, global_batch=64, seed=0)
    batch = next(it)  # {"inputs": int32[local_batch, 1024], "targets": ...}

With no inputs, `default_dataset()` prepares (once, cached) the Python standard library
source with the byte tokenizer: real text, always present, no download.
"""

from spjax.data.pipeline import TokenWindows, TrainIterator, eval_batches, train_batches, train_iterator
from spjax.data.prepare import (cache_root, default_dataset, load_meta, load_tokenizer,
                                prepare_dataset, unigram_entropy)
from spjax.data.sources import resolve_inputs, stdlib_inputs
from spjax.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, train_bpe

__all__ = [
    "ByteTokenizer",
    "HFTokenizer",
    "TokenWindows",
    "TrainIterator",
    "Tokenizer",
    "cache_root",
    "default_dataset",
    "eval_batches",
    "load_meta",
    "load_tokenizer",
    "prepare_dataset",
    "resolve_inputs",
    "stdlib_inputs",
    "train_bpe",
    "train_batches",
    "train_iterator",
    "unigram_entropy",
]
