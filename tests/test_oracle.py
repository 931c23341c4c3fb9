"""Tests of the eager Highway-BP oracle itself, against methods that share no code with it.

- k >= L: Highway-BP is exact (Theorem 1), so the oracle must match loss.backward().
- k < L: on linear blocks the Highway-BP gradient is a finite sum over paths crossing at most k
  blocks; enumerate the paths explicitly and compare.
- gamma = 1: Highway-BP is the fixed-point iteration of Wang & Ragni; that loop written out
  inline (helpers.fixed_point_iteration).
"""
import pytest
import torch
import torch.nn as nn

from helpers import (DIFFERENT, EXACT, all_grads, assert_exact_from, assert_grads_close,
                     assert_oracle_exact, build_case, case_id, exact_state_grads,
                     fixed_point_iteration, linear_injections, make_inputs, path_sum, rel_err,
                     seed_of, zero_grads)
from models import GPT, InjectedHead, NoResidual, ResMLP, TwoStreams, stream_loss
from models_general import as_general
from oracle import exact_backward, highway_backward, param_grads

# -----------------------------------------------------------------------------
# the models, by name, at a given stream length L


def make_model(name, L):
    """(float64 model whose (every) stream has L steps, stream_view kwargs: none here)."""
    if name == "resmlp":
        model = ResMLP(d=8, hidden=16, n_blocks=L)
    elif name == "gpt":
        model = GPT(vocab=32, block_size=8, n_layer=L // 2, n_head=2, n_embd=16)
    elif name == "gpt_tied":
        model = GPT(vocab=32, block_size=8, n_layer=L // 2, n_head=2, n_embd=16, tie_weights=True)
    elif name == "twostreams":
        model = TwoStreams(d=8, hidden=16, n_blocks=L)
    elif name == "injected_tap0":
        model = InjectedHead(d=8, hidden=16, n_blocks=L, tap=0)
    elif name == "injected_mid":
        model = InjectedHead(d=8, hidden=16, n_blocks=L, tap=L // 2)
    elif name == "injected_end":
        model = InjectedHead(d=8, hidden=16, n_blocks=L, tap=L)
    elif name == "noresidual":
        model = NoResidual(d=8, hidden=16, n_layers=L)
    else:
        raise ValueError(name)
    return model.double(), {}


STREAM_CASES = (
    [(name, L) for name in ("resmlp", "twostreams", "injected_mid") for L in (1, 2, 5, 8)]
    + [("injected_tap0", L) for L in (1, 5)]
    + [("injected_end", L) for L in (1, 5)]
    + [("gpt", 2), ("gpt", 8), ("gpt_tied", 4)]
)


# -----------------------------------------------------------------------------
# the models' own contract


@pytest.mark.parametrize("case", STREAM_CASES + [("noresidual", 4)], ids=case_id)
def test_stream_view_matches_forward(case):
    name, L = case
    model, _, inputs = build_case(make_model, case, "view", case)
    streams, head = model.stream_view(*inputs)
    assert all(len(blocks) == L for _, blocks in streams)
    assert (len(streams) == 0) == (name == "noresidual")
    assert torch.equal(stream_loss(streams, head), model(*inputs))


# -----------------------------------------------------------------------------
# k >= L: Highway-BP is exact backprop


@pytest.mark.parametrize("gamma", [0.0, 0.2])
@pytest.mark.parametrize("extra_rounds", [0, 3])
@pytest.mark.parametrize("case", STREAM_CASES, ids=case_id)
def test_exact_when_k_at_least_L(case, extra_rounds, gamma):
    model, view, inputs = build_case(make_model, case, "exact", case, extra_rounds, gamma)
    assert_oracle_exact(highway_backward, model, view, inputs, case[1] + extra_rounds, gamma)


@pytest.mark.parametrize("k", [0, 2])
def test_no_residual_is_plain_backprop(k):
    model, _, (x,) = build_case(make_model, ("noresidual", 4), "nores", k)
    exact_backward(model, x)
    want = {**param_grads(model), "x": x.grad.clone()}
    model.zero_grad(set_to_none=True)
    x.grad = None
    highway_backward(*model.stream_view(x), k=k)
    assert_grads_close({**param_grads(model), "x": x.grad}, want)


@pytest.mark.parametrize("L", [1, 2, 5, 8])
def test_shared_block_accumulates(L):
    """One block applied L times (an RNN-like stream): its gradient is the sum over steps."""
    torch.manual_seed(seed_of("shared", L))
    model = ResMLP(d=8, hidden=16, n_blocks=1).double()
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    blocks = [model.blocks[0]] * L

    def head(states):
        return model.head(states[0][-1]).pow(2).mean()

    stream_loss([(x, blocks)], head).backward()
    want = {**param_grads(model), "x": x.grad.clone()}
    model.zero_grad(set_to_none=True)
    x.grad = None
    highway_backward([(x, blocks)], head, k=L)
    assert_grads_close({**param_grads(model), "x": x.grad}, want)


# -----------------------------------------------------------------------------
# Theorem 1 on the test models: g^k_l is exact exactly when k >= L - l


@pytest.mark.parametrize("gamma", [0.0, 0.2])
@pytest.mark.parametrize(
    "case", [("resmlp", 5), ("twostreams", 5), ("injected_mid", 5), ("gpt", 4)], ids=case_id
)
def test_exactness_boundary(case, gamma):
    name, L = case
    model, _, inputs = build_case(make_model, case, "boundary", case, gamma)
    want = exact_state_grads(stream_loss, *model.stream_view(*inputs))
    exact_backward(model, *inputs)
    want_params = param_grads(model)

    # which blocks' parameters belong to stream step l (models built from MLPBlocks only)
    step_modules = {
        "resmlp": lambda l: [model.blocks[l]],
        "injected_mid": lambda l: [model.blocks[l]],
        "twostreams": lambda l: [model.blocks_a[l], model.blocks_b[l]],
    }.get(name)
    head_names = [n for n in want_params if "head" in n]
    param_name = {p: n for n, p in model.named_parameters()}

    for k in range(L + 1):
        model.zero_grad(set_to_none=True)
        _, got = highway_backward(*model.stream_view(*inputs), k=k, gamma=gamma)
        got_params = param_grads(model)
        assert_exact_from(got, want, k, lambda l: L - l)
        # block l reads g^k_{l+1}: exact iff k >= L - 1 - l; the head is always exact
        if step_modules is not None:
            for l in range(L):
                for module in step_modules(l):
                    for p in module.parameters():
                        n = param_name[p]
                        err = rel_err(got_params[n], want_params[n])
                        assert (err < EXACT) if k >= L - 1 - l else (err > DIFFERENT), (k, l, n, err)
        for n in head_names:
            assert rel_err(got_params[n], want_params[n]) < EXACT, (k, n)


# -----------------------------------------------------------------------------
# k < L on linear blocks: enumerate the paths (Theorem 1) in closed form


@pytest.mark.parametrize("shared", [False, True], ids=["distinct", "shared"])
@pytest.mark.parametrize("gamma", [0.0, 0.2, 1.0])
@pytest.mark.parametrize("k", [0, 1, 2, 3])
@pytest.mark.parametrize("L", [1, 2, 5, 8])
def test_linear_blocks_match_path_sum(L, k, gamma, shared):
    torch.manual_seed(seed_of("linear", L, k, gamma, shared))
    B, d = 3, 4
    layers = [nn.Linear(d, d, bias=False).double()] * L if shared else [
        nn.Linear(d, d, bias=False).double() for _ in range(L)
    ]
    x = torch.randn(B, d, dtype=torch.float64, requires_grad=True)
    m = L // 2
    c = {0: torch.randn(B, d, dtype=torch.float64), m: torch.randn(B, d, dtype=torch.float64)}
    c_L = torch.randn(B, d, dtype=torch.float64)

    def head(states):
        """A linear loss: injections c_L at x_L, c_m at x_m and c_0 at x_0."""
        xs = states[0]
        return (c_L * xs[L]).sum() + (c[m] * xs[m]).sum() + (c[0] * xs[0]).sum()

    _, (got,) = highway_backward([(x, layers)], head, k=k, gamma=gamma)

    # the injections and the forward states, written out directly
    e = linear_injections(L, m, c[0], c[m], c_L)
    xs = [x.detach()]
    for layer in layers:
        xs.append(xs[-1] + xs[-1] @ layer.weight.detach().T)
    Ws = [layer.weight.detach() for layer in layers]

    for l in range(L + 1):
        assert rel_err(got[l], path_sum(Ws, e, l, k, gamma)) < EXACT, l
    assert rel_err(x.grad, path_sum(Ws, e, 0, k, gamma)) < EXACT

    # dLoss/dW_l = g_{l+1}^T x_l summed over the batch; a shared W gets the sum over steps
    want_W = [path_sum(Ws, e, l + 1, k, gamma).T @ xs[l] for l in range(L)]
    if shared:
        assert rel_err(layers[0].weight.grad, sum(want_W)) < EXACT
    else:
        for l in range(L):
            assert rel_err(layers[l].weight.grad, want_W[l]) < EXACT, l


# -----------------------------------------------------------------------------
# gamma = 1: the fixed-point iteration of Wang & Ragni (helpers.fixed_point_iteration)


@pytest.mark.parametrize("k", [0, 1, 3, 5])
@pytest.mark.parametrize("model_cls", [ResMLP, InjectedHead])
def test_gamma_one_is_fixed_point_iteration(model_cls, k):
    torch.manual_seed(seed_of("fpi", model_cls.__name__, k))
    L = 5
    model = model_cls(d=8, hidden=16, n_blocks=L).double()
    (x,) = make_inputs(model)
    streams, head = model.stream_view(x)
    [(x0, steps)] = as_general(streams)
    fixed_point_iteration(x0, steps, head, k)
    want = all_grads(model, (x,))
    zero_grads(model, (x,))

    highway_backward(*model.stream_view(x), k=k, gamma=1.0)
    assert_grads_close(all_grads(model, (x,)), want)
