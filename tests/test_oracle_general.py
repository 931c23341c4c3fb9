"""Tests of the general-residual Highway-BP oracle (oracle_general.py) and its models.

- every model's stream view reproduces forward's loss;
- k >= L: Highway-BP is exact (Theorem 1), so the oracle must match loss.backward();
- identity residuals: the general oracle equals oracle.highway_backward at every k;
- k < L on a linear model with diagonal K: closed-form path sums;
- gamma = 1: the fixed-point iteration, written out inline (helpers.fixed_point_iteration);
- Theorem 1's boundary (g^k_l exact iff k >= L - l) with non-identity K;
- BatchNorm buffers, nn.GRUCell equivalence, the two post-LN and the two LSTM decompositions.
"""
import pytest
import torch
import torch.nn as nn

from helpers import (DIFFERENT, EXACT, all_grads, assert_exact_from, assert_grads_close,
                     assert_oracle_exact, build_case, case_id, exact_state_grads,
                     fixed_point_iteration, linear_injections, make_inputs, path_sum, rel_err,
                     seed_of, zero_grads)
from models import GPT, InjectedHead, ResMLP, TwoStreams
from models_general import (
    ElmanLoop,
    GatedMLP,
    GRUCellLoop,
    GRULoop,
    LayerScaleMLP,
    LSTMLoop,
    PostActResNet,
    PostLNEncoder,
    as_general,
    as_identity,
    stream_loss_general,
)
from oracle import highway_backward
from oracle_general import highway_backward_general


# -----------------------------------------------------------------------------
# the models, by name, at stream length L; `view` holds stream_view's extra arguments


def make_model(name, L):
    """(float64 model whose stream has L steps, stream_view kwargs)."""
    if name == "postact":
        model, view = PostActResNet(channels=4, n_blocks=L, size=5), {}
    elif name == "gru":
        model, view = GRULoop(input_size=3, hidden=8, T=L), {}
    elif name == "grucell":
        model, view = GRUCellLoop(input_size=3, hidden=8, T=L), {}
    elif name == "lstm_ch":
        model, view = LSTMLoop(input_size=3, hidden=8, T=L), {"view": "ch"}
    elif name == "lstm_co":
        model, view = LSTMLoop(input_size=3, hidden=8, T=L), {"view": "co"}
    elif name == "elman":
        model, view = ElmanLoop(input_size=3, hidden=8, T=L), {}
    elif name == "layerscale":
        model, view = LayerScaleMLP(d=8, n_blocks=L, hidden=16), {}
    elif name == "gated":
        model, view = GatedMLP(d=8, n_blocks=L, hidden=16), {}
    elif name == "postln":
        model, view = PostLNEncoder(vocab=16, d=16, n_head=2, n_layer=L // 2, T=5), {}
    elif name == "postln_paper":
        model = PostLNEncoder(vocab=16, d=16, n_head=2, n_layer=L // 2, T=5)
        view = {"paper_algebra": True}
    else:
        raise ValueError(name)
    return model.double(), view


CASES = (
    [("postact", L) for L in (1, 3)]
    + [("gru", L) for L in (1, 5, 12)]
    + [("grucell", L) for L in (3, 8)]
    + [(name, L) for name in ("lstm_ch", "lstm_co") for L in (1, 4, 9)]
    + [("elman", L) for L in (2, 7)]
    + [("layerscale", L) for L in (1, 4)]
    + [("gated", L) for L in (1, 2, 6)]
    + [(name, L) for name in ("postln", "postln_paper") for L in (2, 4)]
)


# -----------------------------------------------------------------------------
# (a) the models' own contract


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_stream_view_matches_forward(case):
    name, L = case
    model, view, inputs = build_case(make_model, case, "view", case)
    streams, head = model.stream_view(*inputs, **view)
    assert all(len(steps) == L for _, steps in streams)
    got, want = stream_loss_general(streams, head), model(*inputs)
    if name == "postln_paper":
        # the paper's algebra re-associates LayerNorm's arithmetic: equal to rounding only
        # (on this CPU build it happens to be bit-identical too)
        assert rel_err(got, want) < 1e-14
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("hidden", [5, 8, 13, 16])
def test_grucell_decomposition_is_nn_grucell(hidden):
    torch.manual_seed(seed_of("grucell-step", hidden))
    model = GRUCellLoop(input_size=3, hidden=hidden, T=6).double()
    (x,) = make_inputs(model)
    h = torch.randn(3, hidden, dtype=torch.float64)
    for t in range(x.size(1)):
        want = model.cell(x[:, t], h)
        got = model.update(h, *model.gates(x[:, t], h))
        assert rel_err(got, want) < 1e-15
        assert torch.equal(got, want)  # same ops in the same order as aten's CPU gru_cell
        h = want.detach()


def test_batchnorm_buffers_updated_once_per_pass():
    """The oracle calls each BatchNorm block once: its buffers end up as after one forward."""
    model, _, inputs = build_case(make_model, ("postact", 3), "bn-buffers")
    start = {n: b.clone() for n, b in model.named_buffers()}

    model(*inputs)
    after_forward = {n: b.clone() for n, b in model.named_buffers()}
    assert any(not torch.equal(after_forward[n], start[n]) for n in start)

    for k in (0, 2):
        model.load_state_dict({**model.state_dict(), **start})
        highway_backward_general(*model.stream_view(*inputs), k=k)
        for n, b in model.named_buffers():
            assert torch.equal(b, after_forward[n]), (k, n)


# -----------------------------------------------------------------------------
# (b) k >= L: Highway-BP is exact backprop


@pytest.mark.parametrize("gamma", [0.0, 0.2])
@pytest.mark.parametrize("extra_rounds", [0, 2])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_exact_when_k_at_least_L(case, extra_rounds, gamma):
    model, view, inputs = build_case(make_model, case, "exact", case, extra_rounds, gamma)
    # the paper's algebra re-associates LayerNorm's arithmetic: its loss is equal to rounding only
    loss_tol = 1e-14 if case[0] == "postln_paper" else 0.0
    assert_oracle_exact(highway_backward_general, model, view, inputs, case[1] + extra_rounds,
                        gamma, loss_tol)


# -----------------------------------------------------------------------------
# (c) identity residuals: the general oracle is the identity oracle


def identity_cases():
    """(name, model, general view kwargs, identity stream view builder)."""
    return {
        "resmlp": lambda: ResMLP(d=8, hidden=16, n_blocks=5),
        "injected": lambda: InjectedHead(d=8, hidden=16, n_blocks=5, tap=2),
        "twostreams": lambda: TwoStreams(d=8, hidden=16, n_blocks=4),
        "gpt": lambda: GPT(vocab=16, block_size=6, n_layer=2, n_head=2, n_embd=16),
        "elman": lambda: ElmanLoop(input_size=3, hidden=8, T=6),
        "layerscale": lambda: LayerScaleMLP(d=8, n_blocks=5, hidden=16),
    }


def views(name, model, inputs):
    """(general view, identity-oracle view) of the same model, each from its own stream_view
    call (a view's prelude graph is consumed by the oracle's final backward)."""
    if name == "elman":
        streams, head = model.stream_view(*inputs)
        return (streams, head), (as_identity(model.stream_view(*inputs)[0]), head)
    if name == "layerscale":
        # gamma_l as a residual parameter (x + gamma * z) vs folded into the block (K = I)
        streams, head = model.stream_view(*inputs, scale_in_block=True)
        return model.stream_view(*inputs), (as_identity(streams), head)
    streams, head = model.stream_view(*inputs)
    return (as_general(model.stream_view(*inputs)[0]), head), (streams, head)


@pytest.mark.parametrize("gamma", [0.0, 0.2])
@pytest.mark.parametrize("k", [0, 1, 2])
@pytest.mark.parametrize("name", list(identity_cases()))
def test_identity_residual_equals_identity_oracle(name, k, gamma):
    torch.manual_seed(seed_of("identity", name, k, gamma))
    model = identity_cases()[name]().double()
    inputs = make_inputs(model)
    general, identity = views(name, model, inputs)

    want_loss, want_g = highway_backward(*identity, k=k, gamma=gamma)
    want = all_grads(model, inputs)
    zero_grads(model, inputs)
    loss, got_g = highway_backward_general(*general, k=k, gamma=gamma)

    assert torch.equal(loss, want_loss)
    for got_stream, want_stream in zip(got_g, want_g, strict=True):
        for l, (a, b) in enumerate(zip(got_stream, want_stream, strict=True)):
            if name == "layerscale":
                assert rel_err(a, b) < EXACT, l
            else:
                assert torch.equal(a, b), l  # the same ops in the same order
    assert_grads_close(all_grads(model, inputs), want)


# -----------------------------------------------------------------------------
# (d) k < L, linear steps x_{l+1} = a_l * x_l + x_l W_l^T: paths in closed form


@pytest.mark.parametrize("gamma", [0.0, 0.3])
@pytest.mark.parametrize("k", [0, 1, 2, 3])
@pytest.mark.parametrize("L", [1, 2, 5, 7])
def test_diagonal_K_matches_path_sum(L, k, gamma):
    torch.manual_seed(seed_of("diag-linear", L, k, gamma))
    B, d = 3, 4
    layers = [nn.Linear(d, d, bias=False).double() for _ in range(L)]
    # a_l: learned residual parameters (their gradient is the residual's VJP at g^k_{l+1})
    scales = [nn.Parameter(torch.rand(d, dtype=torch.float64) + 0.5) for _ in range(L)]
    x = torch.randn(B, d, dtype=torch.float64, requires_grad=True)
    m = L // 2
    c0, cm, cL = (torch.randn(B, d, dtype=torch.float64) for _ in range(3))
    steps = [
        (lambda x, lin=lin: (lin(x),), lambda x, z, a=a: a * x + z) for lin, a in zip(layers, scales)
    ]

    def head(states):
        xs = states[0]
        return (cL * xs[L]).sum() + (cm * xs[m]).sum() + (c0 * xs[0]).sum()

    _, (got,) = highway_backward_general([(x, steps)], head, k=k, gamma=gamma)

    e = linear_injections(L, m, c0, cm, cL)
    As = [a.detach() for a in scales]
    Ws = [lin.weight.detach() for lin in layers]
    xs = [x.detach()]
    for a, W in zip(As, Ws):
        xs.append(a * xs[-1] + xs[-1] @ W.T)

    for l in range(L + 1):
        assert rel_err(got[l], path_sum(Ws, e, l, k, gamma, As)) < EXACT, l
    assert rel_err(x.grad, path_sum(Ws, e, 0, k, gamma, As)) < EXACT
    for l in range(L):
        g_next = path_sum(Ws, e, l + 1, k, gamma, As)
        assert rel_err(layers[l].weight.grad, g_next.T @ xs[l]) < EXACT, l
        assert rel_err(scales[l].grad, (g_next * xs[l]).sum(0)) < EXACT, l


# -----------------------------------------------------------------------------
# (e) gamma = 1: the fixed-point iteration (Wang & Ragni), helpers.fixed_point_iteration


@pytest.mark.parametrize("k", [0, 1, 3, 5])
@pytest.mark.parametrize(
    "case", [("gated", 5), ("gru", 6), ("lstm_ch", 5), ("postln", 4)], ids=case_id
)
def test_gamma_one_is_fixed_point_iteration(case, k):
    model, view, inputs = build_case(make_model, case, "fpi", case, k)
    [(x0, steps)], head = model.stream_view(*inputs, **view)
    fixed_point_iteration(x0, steps, head, k)
    want = all_grads(model, inputs)
    zero_grads(model, inputs)

    highway_backward_general(*model.stream_view(*inputs, **view), k=k, gamma=1.0)
    assert_grads_close(all_grads(model, inputs), want)


# -----------------------------------------------------------------------------
# (f) Theorem 1 with non-identity K: g^k_l is exact exactly when k >= L - l


@pytest.mark.parametrize("gamma", [0.0, 0.2])
@pytest.mark.parametrize(
    "case",
    [("gated", 5), ("postact", 4), ("gru", 6), ("lstm_ch", 5), ("lstm_co", 5)]
    + [("postln", 4), ("postln_paper", 4)],
    ids=case_id,
)
def test_exactness_boundary(case, gamma):
    name, L = case
    model, view, inputs = build_case(make_model, case, "boundary", case, gamma)
    want = exact_state_grads(stream_loss_general, *model.stream_view(*inputs, **view))

    def exact_from(l):
        """The first k at which g^k_l is exact: L - l, one earlier where block l ignores x_l."""
        if name == "lstm_co" and l == 0 and gamma == 0:
            # block 0 reads the initial h0, not x_0: g_0 = K_0^T g_1 (with gamma > 0 the
            # gamma * K_0 share is on the block side, one round behind, and the usual L holds)
            return L - 1
        return L - l

    for k in range(L + 1):
        _, got = highway_backward_general(*model.stream_view(*inputs, **view), k=k, gamma=gamma)
        assert_exact_from(got, want, k, exact_from)


# -----------------------------------------------------------------------------
# two decompositions of one model: same exact gradient, Highway-BP differs (or not) for k < L


def decomposition_grads(model, inputs, view, k):
    zero_grads(model, inputs)
    highway_backward_general(*model.stream_view(*inputs, **view), k=k)
    return all_grads(model, inputs)


@pytest.mark.parametrize("L", [4, 6])
def test_post_ln_decompositions(L):
    """LN(x + z) with the full LN Jacobian as K vs the paper's algebra with K = diag(w * rstd).

    Both are exact decompositions, but they split the same Jacobian differently between K and J
    (the paper moves mu's and sigma's dependence on x to the block side), so their Highway-BP
    gradients differ below the exactness boundary: the layers' parameters (VJP at g^k_{l+1})
    agree once k >= L - 1, the prelude (through g^k_0) once k >= L.
    """
    model, _, inputs = build_case(make_model, ("postln", L), "postln-two", L)
    for k in range(L + 1):
        full = decomposition_grads(model, inputs, {}, k)
        paper = decomposition_grads(model, inputs, {"paper_algebra": True}, k)
        errs = {n: rel_err(paper[n], full[n]) for n in full}
        layers = max(e for n, e in errs.items() if n.startswith("layers."))
        prelude = max(e for n, e in errs.items() if n.split(".")[0] in ("wte", "wpe", "ln_emb"))
        head = max(e for n, e in errs.items() if n.startswith("lm_head."))
        assert head < EXACT, k
        assert (layers < EXACT) if k >= L - 1 else (layers > DIFFERENT), (k, layers)
        assert (prelude < EXACT) if k >= L else (prelude > DIFFERENT), (k, prelude)


@pytest.mark.parametrize("L", [4, 7])
def test_lstm_decompositions(L):
    """Stream (c, h) and stream (c, o) carry the same paths except at the initial h0.

    In (c, h) the factor d h_t / d c_t = o_t tanh'(c_t) sits in K_t (residual path); in (c, o)
    it sits in block t+1, which recomputes h_t = o_t tanh(c_t). Either way the path from the
    gates of step t+1 down to c_t crosses exactly one block (t+1), so for t >= 1 the sets of
    paths with at most k block crossings are the same and so are all gradients but h0's.
    h0 is x_0's h half in (c, h): it gets J_0^T g^{k-1}_1 through round k's v_0 (zero at k = 0,
    exact from k = L); in (c, o) block 0 reads h0 as a side input, which gets block 0's final VJP
    at g^k_1 (exact from k = L - 1). So h0 differs for k < L and agrees at k >= L.
    """
    model, _, inputs = build_case(make_model, ("lstm_ch", L), "lstm-two", L)
    for k in range(L + 1):
        ch = decomposition_grads(model, inputs, {"view": "ch"}, k)
        co = decomposition_grads(model, inputs, {"view": "co"}, k)
        h0_ch, h0_co = ch.pop("h0"), co.pop("h0")
        assert_grads_close(co, ch)
        err = rel_err(h0_co, h0_ch)
        assert (err < EXACT) if k >= L else (err > DIFFERENT), (k, err)
        assert (h0_ch.abs().max() == 0) == (k == 0)
