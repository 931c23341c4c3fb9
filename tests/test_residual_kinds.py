"""Residual functions beyond x + z, found by the pointwise rule: ReLU after the add, gates,
GRU updates over time; K_l = dr/dx_l runs through the diagonal scan.

Oracle: tests/oracle_general.py (eager, VJPs only, no diagonal assumption) and eager autograd.
"""
import pytest
import torch

from hbp_compile.debug import readable

from helpers import (assert_exact, assert_grads_match, assert_matches,
                     assert_matches_general_oracle, assert_not_exact, compiled, exact, lstm_oracle,
                     max_rel_err, oracle_general, worst_param)
from models_general import (ElmanLoop, GatedMLP, GRUCellLoop, GRULoop, LayerScaleMLP,
                            LSTMLoop, PostActResNet, PostLNEncoder, StagedResNet)

# name -> (factory, stream length, residual kind, the oracle's view of the model)
MODELS = {
    "post_act_resnet": (lambda: PostActResNet(n_blocks=4), 4, "relu-after-add", {}),
    "gru_loop": (lambda: GRULoop(T=8), 8, "gated", {}),
    "gru_cell_loop": (lambda: GRUCellLoop(T=8), 8, "gated", {}),
    "gated_mlp": (lambda: GatedMLP(n_blocks=5), 5, "gated", {}),
    "layerscale": (lambda: LayerScaleMLP(n_blocks=5), 5, "identity", {}),
    "elman": (lambda: ElmanLoop(T=8), 8, "identity", {}),
    # BERT's LN(x + z) in the paper's algebra: mu, rstd of x + z are block outputs
    "post_ln": (lambda: PostLNEncoder(n_layer=2), 4, "post-LN", {"paper_algebra": True}),
}


def build(name, batch=3):
    factory, L, kind, _ = MODELS[name]
    model = factory().double()
    return model, model.example_inputs(batch), L, kind


@pytest.mark.parametrize("name", MODELS)
def test_found_and_exact_at_L(name):
    torch.manual_seed(1)
    model, inputs, L, kind = build(name)
    (report,) = assert_exact(model, inputs, L).reports
    (stream,) = report.streams
    assert stream.length == L and stream.residual_kind.startswith(kind)
    assert all(g.batched for g in stream.groups)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("k", [0, 1, 2])
def test_matches_general_oracle(name, k):
    torch.manual_seed(10 + k)
    model, inputs, L, _ = build(name)
    assert_matches_general_oracle(model, inputs, k, **MODELS[name][3])


@pytest.mark.parametrize("name,gamma", [("gated_mlp", 0.2), ("gru_loop", 0.2), ("gated_mlp", 1.0),
                                        ("post_ln", 0.8)])
@pytest.mark.parametrize("k", [1, 2])
def test_gamma_split_matches_oracle(name, gamma, k):
    """K -> (1 - gamma) K and + gamma K g in each block VJP; gamma = 1 is fixed-point iteration
    (the oracle's gamma = 1 is checked against a direct fixed-point loop in its own tests).
    post_ln at 0.8 is the paper's RoBERTa setting."""
    torch.manual_seed(20 + k)
    model, inputs, _, _ = build(name)
    _, want = oracle_general(model, inputs, k, gamma=gamma, **MODELS[name][3])
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


@pytest.mark.parametrize("T", [6, 12])
def test_lstm_state_widened_to_c_and_h_exact_at_L(T):
    """The cell state chain c_{t+1} = f c_t + i g alone would have block t read o_{t-1} from
    block t-1; the state becomes (c_t, h_t): one stream, one weight-shared group, per-step
    losses as injections."""
    torch.manual_seed(4 + T)
    model = LSTMLoop(T=T).double()
    inputs = model.example_inputs(3)
    want_loss, want = exact(model, inputs)
    loss, got, backend = compiled(model, inputs, T - 1)
    (report,) = backend.reports
    (stream,) = report.streams
    assert stream.length == T - 1 and "state widened to 2 tensors" in stream.residual_kind
    assert [g.size for g in stream.groups] == [T - 1] and stream.groups[0].batched
    assert stream.injections == list(range(1, T - 1))
    assert report.skipped == []
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=0)
    assert max_rel_err(got, want) < 1e-10, worst_param(got, want)


@pytest.mark.parametrize("k", [0, 1, 2])
@pytest.mark.parametrize("scan", ["sequential", "log-depth"])
def test_lstm_matches_the_oracle(k, scan):
    torch.manual_seed(30 + k)
    model = LSTMLoop(T=7).double()
    inputs = model.example_inputs(3)
    want_loss, want = lstm_oracle(model, inputs, k)
    loss, got, backend = assert_matches(want, model, inputs, k, scan=scan)
    assert backend.reports[0].streams[0].scan.startswith(scan)
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=0)
    assert_not_exact(model, inputs, got)


def test_lstm_oracle_view_is_exact_at_L():
    torch.manual_seed(40)
    model = LSTMLoop(T=5).double()
    inputs = model.example_inputs(2)
    assert_grads_match(lstm_oracle(model, inputs, 4)[1], exact(model, inputs)[1])


@pytest.mark.parametrize("k", [1, 2])
def test_lstm_gamma_split(k):
    torch.manual_seed(50 + k)
    model = LSTMLoop(T=6).double()
    inputs = model.example_inputs(3)
    assert_matches(lstm_oracle(model, inputs, k, gamma=0.3)[1], model, inputs, k, gamma=0.3)


def test_lstm_cell_module_loop():
    """nn.LSTMCell in a loop: the same widened stream."""

    class CellLoop(torch.nn.Module):
        def __init__(self, T=6):
            super().__init__()
            self.cell, self.head = torch.nn.LSTMCell(3, 8), torch.nn.Linear(8, 1)

        def forward(self, x):
            h = c = torch.zeros(x.size(0), 8, dtype=x.dtype)
            loss = 0
            for t in range(x.size(1)):
                h, c = self.cell(x[:, t], (h, c))
                loss = loss + self.head(h).pow(2).mean()
            return loss

    torch.manual_seed(41)
    model = CellLoop().double()
    inputs = (torch.randn(2, 6, 3, dtype=torch.double),)
    (report,) = assert_exact(model, inputs, 5).reports
    (stream,) = report.streams
    assert stream.length == 5 and "widened" in stream.residual_kind
    assert "2x2 K_l" in stream.scan
    (skip,) = report.skipped          # h0 and c0 are one zeros tensor: step 1 reads x_0 itself
    assert "first step of a widened" in skip.reason


def test_gru_T32_exact_and_oracle():
    """The issue's size: a GRU-cell loop over T = 32 steps, loss at the last step."""
    torch.manual_seed(5)
    model = GRULoop(T=32).double()
    inputs = model.example_inputs(3)
    assert assert_exact(model, inputs, 32).reports[0].streams[0].length == 32
    torch._dynamo.reset()
    assert_matches(oracle_general(model, inputs, 2)[1], model, inputs, 2)


@pytest.mark.parametrize("k", [1, 3])
def test_pre_ln_gpt_gamma_split(k):
    """The paper's GPT-2 setting: pre-LN transformer, gamma = 0.2."""
    from helpers import oracle
    from models import GPT

    torch.manual_seed(6 + k)
    model = GPT(n_layer=2).double()
    inputs = model.example_inputs(2)
    _, _, backend = assert_matches(oracle(model, inputs, k, gamma=0.2)[1], model, inputs, k,
                                   gamma=0.2)
    assert "(1-gamma)" in backend.reports[0].streams[0].scan


def test_post_ln_blocks_and_module_paths():
    """Two groups (attention, MLP) of n_layer blocks; each block holds its LayerNorm's statistics
    and the embedding LayerNorm (no residual add under it) is left as the native op."""
    torch.manual_seed(7)
    model, inputs, L, _ = build("post_ln")
    _, _, backend = compiled(model, inputs, 1)
    (report,) = backend.reports
    (stream,) = report.streams
    assert [b.module_path for b in stream.blocks] == \
        ["layers.0[attn, ln_1]", "layers.0[mlp, ln_2]", "layers.1[attn, ln_1]", "layers.1[mlp, ln_2]"]
    assert [g.members for g in stream.groups] == [[0, 2], [1, 3]]
    assert all(g.batched for g in stream.groups)
    assert readable(report.graphs["rewritten"]).count("aten.native_layer_norm") == 1     # ln_emb


def test_post_norm_left_out_of_streams_is_native_again():
    """Post-LN steps that no stream takes (here: shorter than min_length) keep native_layer_norm,
    and the stream beside them is still rewritten: gradients exact at k = L."""

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = GatedMLP(n_blocks=3)
            self.enc = PostLNEncoder(n_layer=1)

        def forward(self, x, idx, targets):
            return self.mlp(x) + self.enc(idx, targets)

    torch.manual_seed(8)
    model = Model().double()
    inputs = (*model.mlp.example_inputs(4), *model.enc.example_inputs(4))
    _, want = exact(model, inputs)
    _, got, backend = compiled(model, inputs, 3, min_length=3)
    (report,) = backend.reports
    assert [s.length for s in report.streams] == [3]
    assert any("min_length=3" in s.reason for s in report.skipped)
    assert readable(report.graphs["rewritten"]).count("aten.native_layer_norm") == 3   # ln_emb, ln_1, ln_2
    assert max_rel_err(got, want) < 1e-10, worst_param(got, want)


def test_final_norm_of_a_pre_ln_stream_is_the_head():
    """GPT's ln_f(x_{L-1} + z) closes a pre-LN stream: it stays in the head, not a post-LN step."""
    from models import GPT

    torch.manual_seed(9)
    model = GPT(n_layer=2).double()
    _, _, backend = compiled(model, model.example_inputs(2), 1)
    (stream,) = backend.reports[0].streams
    assert stream.residual_kind == "identity" and stream.length == 4


@pytest.mark.parametrize("scan", ["sequential", "chunked", "log-depth"])
def test_both_scans_match_the_oracle(scan):
    """scan= forces one form of the diagonal scan; "auto" picks by length (choose_scan)."""
    from hbp_compile.rewrite.scan import choose_scan

    torch.manual_seed(11)
    model, inputs, L, _ = build("gru_loop")
    _, want = oracle_general(model, inputs, 2)
    _, got, backend = compiled(model, inputs, 2, scan=scan)
    assert backend.reports[0].streams[0].scan.startswith(scan)
    assert max_rel_err(got, want) < 1e-10, worst_param(got, want)
    torch._dynamo.reset()
    _, _, backend = compiled(model, inputs, 2)
    assert backend.reports[0].streams[0].scan.startswith(choose_scan(L + 1, "cpu"))


@pytest.mark.parametrize("k,gamma", [(1, 0.0), (2, 0.0), (3, 0.0), (1, 0.3)])
def test_projection_shortcut_is_a_step_of_the_stream(k, gamma):
    """relu(P x + f(x)) is a step: one stream of 5, reported, equal to the oracle (which takes
    the dense K_l^T by autograd through P) at k < L, exact at k = L."""
    torch.manual_seed(12 + k)
    model = StagedResNet().double()
    inputs = (torch.randn(2, 4, 8, 8, dtype=torch.double),)
    _, want = oracle_general(model, inputs, k, gamma=gamma)
    _, got, backend = compiled(model, inputs, k, gamma=gamma)
    (report,) = backend.reports
    (stream,) = report.streams
    assert stream.length == 5 and "projection" in stream.residual_kind, str(report)
    assert "projection step(s) [2]" in stream.scan and report.coverage == 1.0, str(report)
    assert max_rel_err(got, want) < 1e-10, worst_param(got, want)
    assert max_rel_err(got, exact(model, inputs)[1]) > 1e-6
    assert_exact(model, inputs, 5)
