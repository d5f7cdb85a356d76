"""Sparse experts: the sparsity rules reach MoE expert stacks (E x d_in x d_out) like any
linear layer. Exact per-stack densities, pruned expert weights stay zero through training,
N:M valid inside every expert, ERK per expert, masks sharded like their kernels over
`expert`, FLOP accounting at top_k / E. Low-rank experts: tests/test_lowrank_experts.py."""

import math

import numpy as np
import pytest

from spjax.config import load_config
from spjax.sparsity.masks import erk_densities
from spjax.train import accounting as flops_lib
from spjax.train.state import Program

from tests.test_moe import MODEL, Run, _batches

EXPERT_NAMES = [f"layers/{i}/moe/{w}" for i in range(2) for w in ("gate", "up", "down")]
ONLY_EXPERTS = 'sparsity.rules=[[".*/moe/.*", sparse], [".*", dense]]'


def _expert_masks(run: Run) -> dict[str, np.ndarray]:
    layers = run.state.structure["layers"]
    return {f"layers/{i}/moe/{w}": np.asarray(layers[i]["moe"][w]["mask"])
            for i in range(2) for w in ("gate", "up", "down")}


def _expert_kernels(run: Run) -> dict[str, np.ndarray]:
    layers = run.state.params["layers"]
    return {f"layers/{i}/moe/{w}": np.asarray(layers[i]["moe"][w]["kernel"])
            for i in range(2) for w in ("gate", "up", "down")}


def test_static_sparse_experts_keep_exact_density_and_zeros_through_training():
    run = Run("sparsity=static", "sparsity.sparsity=0.75", "sparsity.distribution=uniform")
    masks = _expert_masks(run)
    assert set(masks) == set(EXPERT_NAMES)  # the default rules make experts sparse
    for name, mask in masks.items():
        assert mask.shape[0] == 8  # one mask per expert, stacked like the kernel
        assert mask.sum() == round(0.25 * mask.size), name
    for tokens in _batches(3):
        run.step(tokens)
    for name, kernel in _expert_kernels(run).items():
        assert np.all(kernel[~masks[name]] == 0.0), name  # pruned weights exactly zero
        assert np.any(kernel[masks[name]] != 0.0), name


def test_srste_two_of_four_is_valid_inside_every_expert():
    run = Run("sparsity=srste_2of4", ONLY_EXPERTS)
    for tokens in _batches(2):
        run.step(tokens)
    for name, mask in _expert_masks(run).items():
        e, d_in, d_out = mask.shape
        groups = mask.reshape(e, d_in // 4, 4, d_out).sum(axis=2)  # along the input dim
        assert np.all(groups == 2), name


def test_erk_treats_each_expert_as_a_layer():
    stacks = {"experts": (8, 32, 64), "attn": (32, 32)}
    as_layers = {**{f"e{i}": (32, 64) for i in range(8)}, "attn": (32, 32)}
    stacked, separate = erk_densities(stacks, 0.3), erk_densities(as_layers, 0.3)
    assert stacked["experts"] == pytest.approx(separate["e0"])
    assert stacked["attn"] == pytest.approx(separate["attn"])


def test_expert_masks_are_sharded_like_their_kernels():
    sharded = Run("sparsity=static", "parallel.expert=4", "parallel.data=2", n_devices=8)
    layer = sharded.layout.state.structure["layers"][0]["moe"]["gate"]["mask"]
    kernel = sharded.layout.state.params["layers"][0]["moe"]["gate"]["kernel"]
    assert layer.spec == kernel.spec and layer.spec[0] == "expert"
    # and training on that mesh equals one device, masks included
    single = Run("sparsity=static")
    for tokens in _batches(2):
        a, b = single.step(tokens), sharded.step(tokens)
        assert float(b["loss"]) == pytest.approx(float(a["loss"]), rel=2e-5)


def test_flops_count_sparse_experts_at_top_k_over_e():
    config = load_config(None, [*MODEL, "train.steps=20", "sparsity=static",
                                "sparsity.sparsity=0.75", ONLY_EXPERTS])
    program = Program.build(config)
    run = Run("sparsity=static", "sparsity.sparsity=0.75", ONLY_EXPERTS)
    measured = program.accounting.measure(run.state.structure)
    m = config.model
    dense = flops_lib.train_flops_per_token(m, config.data.seq_len)
    expert_size = m.moe.num_experts * m.d_model * m.d_ff  # one stack
    kept = sum(int(mask.sum()) for mask in _expert_masks(run).values())
    pruned_used = (6 * expert_size - kept) * m.moe.top_k / m.moe.num_experts  # 6 stacks
    # forward and both gradients skip pruned weights (static sparse training): 6 FLOPs each
    assert float(measured["flops_per_token"]) == pytest.approx(dense - 6 * pruned_used,
                                                               rel=1e-6)
    total = program.model_def.param_count()
    assert float(measured["nonzero_params"]) == total - (6 * expert_size - kept)
    assert math.isclose(kept / (6 * expert_size), 0.25, rel_tol=1e-3)
