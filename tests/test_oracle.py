"""Tests of the eager Highway-BP oracle itself, against methods that share no code with it.

- k >= L: Highway-BP is exact (Theorem 1), so the oracle must match loss.backward().
- k < L: on linear blocks the Highway-BP gradient is a finite sum over paths crossing at most k
  blocks; enumerate the paths explicitly and compare.
- gamma = 1: Highway-BP is the fixed-point iteration of Wang & Ragni; write that loop inline.
"""
import itertools
import zlib

import pytest
import torch
import torch.nn as nn

from models import GPT, InjectedHead, NoResidual, ResMLP, TwoStreams, stream_loss
from oracle import exact_backward, highway_backward, param_grads

EXACT = 1e-10  # float64 rel err of two summation orders of the same gradient
DIFFERENT = 1e-8  # a missing path shows up far above rounding


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: intra-op threads only add contention (3x slower on a busy box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def assert_grads_close(got, want, tol=EXACT):
    errs = {name: rel_err(got[name], want[name]) for name in want}
    assert max(errs.values()) < tol, {n: e for n, e in errs.items() if e >= tol}


# -----------------------------------------------------------------------------
# the models, by name, at a given stream length L


def make_model(name, L):
    """A float64 model whose (every) stream has L steps."""
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
    return model.double()


def make_inputs(model, batch_size=3):
    """Example inputs; float ones require grad so the input gradient is checked too."""
    return tuple(
        x.requires_grad_() if x.is_floating_point() else x for x in model.example_inputs(batch_size)
    )


def input_grads(inputs):
    return {f"input{i}": x.grad.clone() for i, x in enumerate(inputs) if x.is_floating_point()}


STREAM_CASES = (
    [(name, L) for name in ("resmlp", "twostreams", "injected_mid") for L in (1, 2, 5, 8)]
    + [("injected_tap0", L) for L in (1, 5)]
    + [("injected_end", L) for L in (1, 5)]
    + [("gpt", 2), ("gpt", 8), ("gpt_tied", 4)]
)


def case_id(case):
    return f"{case[0]}-L{case[1]}"


def seed_of(*args):
    """A distinct, reproducible seed per test case."""
    return zlib.crc32(repr(args).encode())


def exact_state_grads(streams, head):
    """d loss / d x_l for every state of every stream, by plain backprop through the stream."""
    states = []
    for x0, blocks in streams:
        xs = [x0]
        for blk in blocks:
            xs.append(xs[-1] + blk(xs[-1]))
        states.append(xs)
    flat = [x for xs in states for x in xs]
    grads = iter(torch.autograd.grad(head(states), flat))
    return [[next(grads) for _ in xs] for xs in states]


# -----------------------------------------------------------------------------
# the models' own contract


@pytest.mark.parametrize("case", STREAM_CASES + [("noresidual", 4)], ids=case_id)
def test_stream_view_matches_forward(case):
    name, L = case
    torch.manual_seed(seed_of("view", case))
    model = make_model(name, L)
    inputs = make_inputs(model)
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
    name, L = case
    torch.manual_seed(seed_of("exact", case, extra_rounds, gamma))
    model = make_model(name, L)
    inputs = make_inputs(model)

    want_loss = exact_backward(model, *inputs)
    want = {**param_grads(model), **input_grads(inputs)}
    model.zero_grad(set_to_none=True)
    for x in inputs:
        x.grad = None

    loss, _ = highway_backward(*model.stream_view(*inputs), k=L + extra_rounds, gamma=gamma)
    assert torch.equal(loss, want_loss)
    assert_grads_close({**param_grads(model), **input_grads(inputs)}, want)


@pytest.mark.parametrize("k", [0, 2])
def test_no_residual_is_plain_backprop(k):
    torch.manual_seed(seed_of("nores", k))
    model = make_model("noresidual", 4)
    (x,) = make_inputs(model)
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
    torch.manual_seed(seed_of("boundary", case, gamma))
    model = make_model(name, L)
    inputs = make_inputs(model)
    want = exact_state_grads(*model.stream_view(*inputs))
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
        for g_stream, want_stream in zip(got, want):
            for l in range(L + 1):
                err = rel_err(g_stream[l], want_stream[l])
                assert (err < EXACT) if k >= L - l else (err > DIFFERENT), (k, l, err)
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


def path_sum(Ws, e, m, k, gamma):
    """Sum over paths from each injection e_j (j >= m) back to x_m that cross at most k blocks.

    Step l is crossed either through the block, w -> w @ W_l + gamma w (z = x W^T + gamma x), or
    along the residual, w -> (1 - gamma) w. Row-vector gradients of shape (B, d).
    """
    total = torch.zeros_like(e[m])
    for j in range(m, len(Ws) + 1):
        for n_blocks in range(min(k, j - m) + 1):
            for S in itertools.combinations(range(m, j), n_blocks):
                w = e[j]
                for l in reversed(range(m, j)):
                    w = w @ Ws[l] + gamma * w if l in S else (1 - gamma) * w
                total = total + w
    return total


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
    e = [torch.zeros(B, d, dtype=torch.float64) for _ in range(L + 1)]
    e[L] += c_L
    e[m] += c[m]
    e[0] += c[0]
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
# gamma = 1: the fixed-point iteration of Wang & Ragni, written out inline


@pytest.mark.parametrize("k", [0, 1, 3, 5])
@pytest.mark.parametrize("model_cls", [ResMLP, InjectedHead])
def test_gamma_one_is_fixed_point_iteration(model_cls, k):
    torch.manual_seed(seed_of("fpi", model_cls.__name__, k))
    L = 5
    model = model_cls(d=8, hidden=16, n_blocks=L).double()
    (x,) = make_inputs(model)
    [(_, blocks)], head = model.stream_view(x)

    # Fixed-point iteration: every g_l is recomputed from the previous iterate only,
    # g_l <- J'_l^T g_{l+1} + e_l with J' the Jacobian of block(x) + x; no sweep along the chain.
    with torch.no_grad():
        xs = [x.detach()]
        for blk in blocks:
            xs.append(xs[-1] + blk(xs[-1]))
    xs = [s.clone().requires_grad_() for s in xs]
    loss = head([xs])
    e = list(torch.autograd.grad(loss, xs, retain_graph=True, materialize_grads=True))
    g = [torch.zeros_like(e[0])] + e[1:]  # iterate 0: the injections; nothing has reached x_0 yet
    for _ in range(k):
        g = [
            torch.autograd.grad(blk(xl) + xl, xl, g[l + 1])[0] + (e[l] if l > 0 else 0)
            for l, (blk, xl) in enumerate(zip(blocks, xs[:L]))
        ] + [e[L]]
    for blk, xl, g_next in zip(blocks, xs[:L], g[1:]):
        torch.autograd.backward(blk(xl), g_next)
    loss.backward()
    want = {**param_grads(model), "x": g[0] + e[0]}
    model.zero_grad(set_to_none=True)

    highway_backward(*model.stream_view(x), k=k, gamma=1.0)
    assert_grads_close({**param_grads(model), "x": x.grad}, want)
