"""lm-evaluation-harness model adapter, registered as `spjax`.

    lm_eval.simple_evaluate(model=SpjaxLM(forward, generator, tokenizer, max_length),
                            tasks=["hellaswag"])

It answers the harness's three request types with spjax's own code: `loglikelihood`
(multiple-choice tasks) and `loglikelihood_rolling` (perplexity tasks) through the batched
ContinuationScorer (scoring.py), `generate_until` through the KV-cache Generator. Contexts
longer than the model's context (`max_length`, the run's data.seq_len) keep their last
tokens, as the harness's own HF adapter does.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from spjax.data.tokenizer import Tokenizer
from spjax.evaluation.scoring import ContinuationScorer, rolling_windows
from spjax.generate.generator import Generator
from spjax.generate.sampling import Sampling


@register_model("spjax")
class SpjaxLM(TemplateLM):
    def __init__(self, forward: Callable[[jax.Array], jax.Array], generator: Generator,
                 tokenizer: Tokenizer, max_length: int, batch_size: int = 8,
                 max_gen_toks: int = 256):
        super().__init__()
        self.tokenizer_ = tokenizer
        self.max_length, self.max_gen_toks = max_length, max_gen_toks
        self.generator = generator
        self.scorer = ContinuationScorer(forward, max_length, batch_size,
                                         pad_id=tokenizer.eos_id)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer_.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs: Any) -> list[int]:
        return [int(t) for t in self.tokenizer_.encode(string)]

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        return self.scorer.score([(context, continuation)
                                  for _, context, continuation in requests])

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (text,) in (request.args for request in requests):
            windows = rolling_windows(self.tok_encode(text), self.eot_token_id,
                                      self.max_length)
            out.append(sum(score for score, _ in self.scorer.score(windows)))
        return out

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        out = []
        for context, gen_kwargs in (request.args for request in requests):
            kwargs = dict(gen_kwargs)
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            budget = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            sampling = Sampling(float(kwargs.get("temperature", 0.0))
                                if kwargs.get("do_sample", False) else 0.0)
            keep = max(self.max_length - budget - 1, 1)  # context + EOS + budget fit
            ids = [self.eot_token_id, *self.tok_encode(context)[-keep:]]
            new, _, _ = self.generator.generate_ids([np.asarray(ids, np.int32)], budget,
                                                    sampling)
            text = self.tokenizer_.decode(new[0])
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out
