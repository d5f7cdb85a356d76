"""The lm-evaluation-harness adapter on local tasks (nothing is downloaded): a multiple-choice
task built from the built-in data, a rolling-perplexity task and a generation task, run by
`lm_eval.simple_evaluate`; the harness's numbers must equal spjax's own scoring and decoding
of the same requests."""

import json
import os
import sysconfig
from pathlib import Path

import jax
import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")

from spjax import parallel  # noqa: E402
from spjax.config import load_config  # noqa: E402
from spjax.data.tokenizer import ByteTokenizer  # noqa: E402
from spjax.evaluation.lm_eval_adapter import SpjaxLM  # noqa: E402
from spjax.evaluation.scoring import rolling_windows  # noqa: E402
from spjax.generate.generator import Generator  # noqa: E402
from spjax.train.state import Program, init_state, state_layout  # noqa: E402

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def adapter() -> SpjaxLM:
    config = load_config(None, ["model=tiny", "model.d_model=32", "model.d_ff=64",
                                "model.n_heads=2", "model.n_layers=1", "model.vocab_size=257",
                                "model.compute_dtype=float32", "model.init_std=0.3"])
    program = Program.build(config)
    mesh = parallel.make_mesh(config.parallel, jax.devices()[:1])
    layout = state_layout(program, mesh, parallel.sharding_rules(config.parallel))
    state = init_state(program, layout, seed=0)
    model = program.model_def.merge(state.params, state.structure)
    tokenizer = ByteTokenizer()
    generator = Generator(program.model_def, state.params, state.structure, tokenizer)
    lm = SpjaxLM(lambda t: model(t), generator, tokenizer, max_length=64, batch_size=4,
                 max_gen_toks=8)
    lm._forward = jax.jit(lambda t: model(t))  # for the test's direct computations
    return lm


def _tasks(tmp_path: Path) -> Path:
    """Three task YAMLs over JSONL files written here, from the stdlib's own source."""
    text = (STDLIB / "json" / "decoder.py").read_text()
    snippets = [text[i:i + 48] for i in range(0, 48 * 40, 48)]
    rng = np.random.default_rng(0)
    mc = []
    for i in range(0, 32, 2):
        wrong = [snippets[j][:16] for j in rng.choice(range(33, 40), 3, replace=False)]
        choices = [snippets[i + 1][:16], *wrong]
        mc.append({"context": snippets[i], "choices": choices, "label": 0})
    (tmp_path / "mc.jsonl").write_text("\n".join(json.dumps(d) for d in mc))
    # 48 to 144 bytes: one to three 64-token windows each
    docs = [{"text": s * (1 + i % 3)} for i, s in enumerate(snippets[:6])]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    common = "dataset_path: json\ntest_split: train\n"
    (tmp_path / "mc.yaml").write_text(
        f"task: spjax_local_mc\n{common}dataset_kwargs:\n  data_files: {tmp_path}/mc.jsonl\n"
        "output_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n")
    (tmp_path / "ppl.yaml").write_text(
        f"task: spjax_local_ppl\n{common}dataset_kwargs:\n  data_files: {tmp_path}/docs.jsonl\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    (tmp_path / "gen.yaml").write_text(
        f"task: spjax_local_gen\n{common}dataset_kwargs:\n  data_files: {tmp_path}/mc.jsonl\n"
        "output_type: generate_until\ndoc_to_text: '{{context}}'\n"
        "doc_to_target: '{{choices[0]}}'\ngeneration_kwargs:\n  until: ['\\n\\n']\n"
        "  max_gen_toks: 8\nmetric_list:\n  - metric: exact_match\n")
    return tmp_path


def test_local_tasks_through_the_harness_equal_spjax_scoring(adapter, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    from lm_eval.tasks import TaskManager

    tasks = _tasks(tmp_path)
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    out = lm_eval.simple_evaluate(model=adapter, tasks=["spjax_local_mc", "spjax_local_ppl",
                                                        "spjax_local_gen"],
                                  task_manager=manager, log_samples=True, bootstrap_iters=0)
    results, samples = out["results"], out["samples"]
    assert 0.0 <= results["spjax_local_mc"]["acc,none"] <= 1.0
    # multiple choice: each choice's log-likelihood is spjax's own score of that continuation
    for sample in samples["spjax_local_mc"]:
        for (context_text, continuation_text), response in zip(
                [tuple(a) for a in sample["arguments"]], sample["resps"]):
            assert continuation_text[1:] in sample["doc"]["choices"]  # target_delimiter " "
            context, continuation = adapter._encode_pair(context_text, continuation_text)
            assert float(response[0][0]) == pytest.approx(
                adapter.scorer.score([(context, continuation)])[0][0], rel=1e-6)
    # rolling: every token of the document predicted once, from at most 64 tokens before
    # it: the sum of a direct full forward over each window
    for sample in samples["spjax_local_ppl"]:
        tokens = adapter.tok_encode(sample["doc"]["text"])
        direct = 0.0
        for context, continuation in rolling_windows(tokens, adapter.eot_token_id, 64):
            whole = np.asarray([*context, *continuation], np.int32)
            logits = np.asarray(adapter._forward(whole[None, :-1])[0], np.float64)
            logprobs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True))
                                       .sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
            picks = logprobs[np.arange(len(whole) - 1), whole[1:]]
            direct += picks[-len(continuation):].sum()
        assert float(sample["resps"][0][0]) == pytest.approx(direct, rel=1e-5)
    assert results["spjax_local_ppl"]["bits_per_byte,none"] > 0
    # generation: what the Generator decodes greedily from the same context, cut at 'until'
    for sample in samples["spjax_local_gen"]:
        ids = [adapter.eot_token_id, *adapter.tok_encode(sample["doc"]["context"])]
        new, _, _ = adapter.generator.generate_ids([np.asarray(ids, np.int32)], 8)
        assert sample["resps"][0][0] == adapter.tokenizer_.decode(new[0]).split("\n\n")[0]


def test_model_is_registered_under_spjax():
    from lm_eval.api.registry import get_model

    assert get_model("spjax") is SpjaxLM
    assert os.environ.get("HF_DATASETS_OFFLINE") != "0"
