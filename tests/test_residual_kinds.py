"""Residual functions beyond x + z, found by the pointwise rule: ReLU after the add, gates,
GRU updates over time; K_l = dr/dx_l runs through the diagonal scan.

Oracle: tests/oracle_general.py (eager, VJPs only, no diagonal assumption) and eager autograd.
"""
import copy

import pytest
import torch

from helpers import compiled, exact, max_rel_err, oracle_general, worst_param
from models_general import (ElmanLoop, GatedMLP, GRUCellLoop, GRULoop, LayerScaleMLP,
                            LSTMLoop, PostActResNet, PostLNEncoder)

# name -> (factory, stream length, residual kind)
MODELS = {
    "post_act_resnet": (lambda: PostActResNet(n_blocks=4), 4, "relu-after-add"),
    "gru_loop": (lambda: GRULoop(T=8), 8, "gated"),
    "gru_cell_loop": (lambda: GRUCellLoop(T=8), 8, "gated"),
    "gated_mlp": (lambda: GatedMLP(n_blocks=5), 5, "gated"),
    "layerscale": (lambda: LayerScaleMLP(n_blocks=5), 5, "identity"),
    "elman": (lambda: ElmanLoop(T=8), 8, "identity"),
}


def build(name, batch=3):
    factory, L, kind = MODELS[name]
    model = factory().double()
    return model, model.example_inputs(batch), L, kind


def _no_buffer_updates(model):
    """BatchNorm in train mode updates its buffers on each forward; compare from equal states."""
    return copy.deepcopy(model)


@pytest.mark.parametrize("name", MODELS)
def test_found_and_exact_at_L(name):
    torch.manual_seed(1)
    model, inputs, L, kind = build(name)
    _, want = exact(model, inputs)
    loss, got, backend = compiled(model, inputs, L)
    (report,) = backend.reports
    (stream,) = report.streams
    assert stream.length == L and stream.residual_kind.startswith(kind)
    assert all(g.batched for g in stream.groups)
    assert max_rel_err(got, want) < 1e-10, worst_param(got, want)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("k", [0, 1, 2])
def test_matches_general_oracle(name, k):
    torch.manual_seed(10 + k)
    model, inputs, L, _ = build(name)
    _, want = oracle_general(model, inputs, k)
    _, got, _ = compiled(model, inputs, k)
    assert max_rel_err(got, want) < 1e-10, worst_param(got, want)
    _, exact_grads = exact(model, inputs)
    assert max_rel_err(got, exact_grads) > 1e-6          # the comparison above can fail


@pytest.mark.parametrize("name,gamma", [("gated_mlp", 0.2), ("gru_loop", 0.2), ("gated_mlp", 1.0)])
@pytest.mark.parametrize("k", [1, 2])
def test_gamma_split_matches_oracle(name, gamma, k):
    """K -> (1 - gamma) K and + gamma K g in each block VJP; gamma = 1 is fixed-point iteration
    (the oracle's gamma = 1 is checked against a direct fixed-point loop in its own tests)."""
    torch.manual_seed(20 + k)
    model, inputs, _, _ = build(name)
    _, want = oracle_general(model, inputs, k, gamma=gamma)
    _, got, _ = compiled(model, inputs, k, gamma=gamma)
    assert max_rel_err(got, want) < 1e-10, worst_param(got, want)


def test_gru_loop_is_one_weight_shared_group_with_diagonal_scan():
    torch.manual_seed(3)
    model, inputs, L, _ = build("gru_loop")
    _, _, backend = compiled(model, inputs, 2)
    (stream,) = backend.reports[0].streams
    (group,) = stream.groups
    assert group.size == L and group.batched and group.shared_captures == 2   # hh: w and b
    assert "diagonal scan" in stream.scan
    assert stream.vjps_per_round == {"1": 1, "2": 1, "final": 1}


@pytest.mark.parametrize("factory", [lambda: LSTMLoop(T=6), lambda: PostLNEncoder(n_layer=2)],
                         ids=["lstm", "post_ln"])
def test_unsupported_forms_stay_exact_and_say_why(factory):
    """LSTM (block t reads o_{t-1}, not only c_{t-1}) and post-LN: exact backprop, reported."""
    torch.manual_seed(4)
    model = factory().double()
    inputs = model.example_inputs(3)
    _, want = exact(model, inputs)
    _, got, backend = compiled(model, inputs, 0)
    (report,) = backend.reports
    assert report.streams == [] and report.skipped
    assert max_rel_err(got, want) < 1e-12, worst_param(got, want)


def test_gru_T32_exact_and_oracle():
    """The issue's size: a GRU-cell loop over T = 32 steps, loss at the last step."""
    torch.manual_seed(5)
    model = GRULoop(T=32).double()
    inputs = model.example_inputs(3)
    _, want = exact(model, inputs)
    _, got, backend = compiled(model, inputs, 32)
    assert backend.reports[0].streams[0].length == 32
    assert max_rel_err(got, want) < 1e-10, worst_param(got, want)
    torch._dynamo.reset()
    _, want = oracle_general(model, inputs, 2)
    _, got, _ = compiled(model, inputs, 2)
    assert max_rel_err(got, want) < 1e-10, worst_param(got, want)


@pytest.mark.parametrize("k", [1, 3])
def test_pre_ln_gpt_gamma_split(k):
    """The paper's GPT-2 setting: pre-LN transformer, gamma = 0.2."""
    from helpers import oracle
    from models import GPT

    torch.manual_seed(6 + k)
    model = GPT(n_layer=2).double()
    inputs = model.example_inputs(2)
    _, want = oracle(model, inputs, k, gamma=0.2)
    _, got, backend = compiled(model, inputs, k, gamma=0.2)
    assert "(1-gamma)" in backend.reports[0].streams[0].scan
    assert max_rel_err(got, want) < 1e-10, worst_param(got, want)
