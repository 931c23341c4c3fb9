"""Glue between the package and the oracle: compile, run one backward, collect gradients."""
import copy
import itertools
import zlib

import torch

from hbp_compile import hbp_backend
from models_general import lstm_stream_from_step_1
from oracle import exact_backward, highway_backward, param_grads


def clone_inputs(inputs, grad_inputs=True):
    """Fresh leaf copies; floating inputs require grad so that dL/dx_0 is compared too."""
    out = []
    for t in inputs:
        t = t.detach().clone()
        if grad_inputs and t.dtype.is_floating_point:
            t.requires_grad_(True)
        out.append(t)
    return out


def grads_of(model, inputs):
    """{name: grad} for parameters and floating inputs ("input.i")."""
    g = param_grads(model)
    for i, t in enumerate(inputs):
        if t.requires_grad and t.grad is not None:         # None: the loss does not read it
            g[f"input.{i}"] = t.grad.detach().clone()
    return g


def exact(model, inputs):
    """Loss and gradients of plain eager autograd, on a copy of the model."""
    m = copy.deepcopy(model)
    xs = clone_inputs(inputs)
    loss = m(*xs)
    loss.backward()
    return loss.detach(), grads_of(m, xs)


def oracle(model, inputs, k, gamma=0.0):
    """Loss and gradients of the independent eager Highway-BP iteration, on a copy."""
    m = copy.deepcopy(model)
    xs = clone_inputs(inputs)
    streams, head = m.stream_view(*xs)
    loss, _ = highway_backward(streams, head, k, gamma=gamma)
    return loss, grads_of(m, xs)


def compiled(model, inputs, k, codegen="eager", **options):
    """Loss, gradients and backend of torch.compile(copy, backend=hbp_backend(k, ...))."""
    m = copy.deepcopy(model)
    options.setdefault("batched", True)          # the batched path, even where "auto" wouldn't
    backend = hbp_backend(iters=k, codegen=codegen, **options)
    cm = torch.compile(m, backend=backend)
    xs = clone_inputs(inputs)
    loss = cm(*xs)
    loss.backward()
    return loss.detach(), grads_of(m, xs), backend


def max_rel_err(got, want, floor=1e-12):
    """Largest per-tensor relative error ||got - want|| / ||want|| over matching names.

    A tensor whose norm is below `floor` times the largest one is compared at that scale: a
    gradient that is zero by symmetry (a key bias before softmax) holds only rounding noise,
    and a ratio of two noises means nothing."""
    assert got.keys() == want.keys()
    scale = max(w.norm().item() for w in want.values())
    worst = 0.0
    for name, w in want.items():
        denom = max(w.norm().item(), floor * scale, 1e-300)
        worst = max(worst, (got[name] - w).norm().item() / denom)
    return worst


def worst_param(got, want):
    """Name and relative error of the worst-matching tensor (for assertion messages)."""
    errs = {n: (got[n] - w).norm().item() / max(w.norm().item(), 1e-300) for n, w in want.items()}
    name = max(errs, key=errs.get)
    return name, errs[name]


def oracle_general(model, inputs, k, gamma=0.0, view_fn=None, **view):
    """Loss and gradients of the eager iteration for any residual function (oracle_general).

    The streams are the copy's `stream_view(*inputs, **view)`, or `view_fn(copy, *inputs)`."""
    from oracle_general import highway_backward_general

    m = copy.deepcopy(model)
    xs = clone_inputs(inputs)
    streams, head = view_fn(m, *xs) if view_fn is not None else m.stream_view(*xs, **view)
    loss, _ = highway_backward_general(streams, head, k, gamma=gamma)
    return loss, grads_of(m, xs)


def lstm_oracle(model, inputs, k, gamma=0.0):
    return oracle_general(model, inputs, k, gamma=gamma, view_fn=lstm_stream_from_step_1)


def assert_grads_match(got, want, tol=1e-10):
    """max_rel_err(got, want) below tol, or zero where tol is 0 (bit for bit)."""
    err = max_rel_err(got, want)
    assert (err == 0.0) if tol == 0 else (err < tol), worst_param(got, want)


def assert_matches(want, model, inputs, k, tol=1e-10, **options):
    """Compiled Highway-BP at k has the gradients `want` (assert_grads_match). Returns the
    compiled run's (loss, grads, backend)."""
    loss, got, backend = compiled(model, inputs, k, **options)
    assert_grads_match(got, want, tol)
    return loss, got, backend


def assert_not_exact(model, inputs, got):
    """`got` (Highway-BP below the exactness boundary) differs from exact backprop: so a test
    that compares it with an oracle could fail."""
    assert max_rel_err(got, exact(model, inputs)[1]) > 1e-6


def assert_exact(model, inputs, k, tol=1e-10, **options):
    """Compiled Highway-BP at k (>= L) equals eager autograd; returns the backend."""
    return assert_matches(exact(model, inputs)[1], model, inputs, k, tol, **options)[2]


def assert_matches_general_oracle(model, inputs, k, tol=1e-10, **view):
    """Compiled Highway-BP at k equals oracle_general's, and differs from exact backprop (so
    the comparison could fail); returns the backend (for its report)."""
    _, want = oracle_general(model, inputs, k, **view)
    _, got, backend = assert_matches(want, model, inputs, k, tol)
    assert_not_exact(model, inputs, got)
    return backend


# -----------------------------------------------------------------------------
# for the oracles' own tests (test_oracle.py, test_oracle_general.py): no compile there

EXACT = 1e-10  # float64 rel err of two summation orders of the same gradient
DIFFERENT = 1e-8  # a missing path shows up far above rounding


def seed_of(*args):
    """A distinct, reproducible seed per test case."""
    return zlib.crc32(repr(args).encode())


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def assert_grads_close(got, want, tol=EXACT):
    assert got.keys() == want.keys()
    errs = {name: rel_err(got[name], want[name]) for name in want}
    assert max(errs.values()) < tol, {n: e for n, e in errs.items() if e >= tol}


def assert_exact_from(got, want, k, exact_from):
    """Per stream and state l: g^k_l (got) is exact where k >= exact_from(l), else differs."""
    for g_stream, want_stream in zip(got, want):
        for l in range(len(want_stream)):
            err = rel_err(g_stream[l], want_stream[l])
            assert (err < EXACT) if k >= exact_from(l) else (err > DIFFERENT), (k, l, err)


def make_inputs(model, batch_size=3):
    """Example inputs; float ones require grad so the input gradient is checked too."""
    return tuple(
        x.requires_grad_() if x.is_floating_point() else x for x in model.example_inputs(batch_size)
    )


def build_case(make_model, case, *seed):
    """(model, stream_view kwargs, inputs) of make_model(*case), drawn under seed_of(*seed)."""
    torch.manual_seed(seed_of(*seed))
    model, view = make_model(*case)
    return model, view, make_inputs(model)


def all_grads(model, inputs):
    """{name: grad} of every parameter and every input that requires grad ("input{i}")."""
    g = param_grads(model)
    g.update({f"input{i}": x.grad.clone() for i, x in enumerate(inputs) if x.requires_grad})
    return g


def zero_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    for x in inputs:
        x.grad = None


def assert_oracle_exact(highway_backward, model, view, inputs, k, gamma, loss_tol=0.0):
    """The oracle (oracle.highway_backward or oracle_general.highway_backward_general) at k >= L
    gives exact backprop's gradients, and its loss bit for bit (to loss_tol where that is > 0)."""
    want_loss = exact_backward(model, *inputs)
    want = all_grads(model, inputs)
    zero_grads(model, inputs)
    loss, _ = highway_backward(*model.stream_view(*inputs, **view), k=k, gamma=gamma)
    assert torch.equal(loss, want_loss) if loss_tol == 0 else rel_err(loss, want_loss) < loss_tol
    assert_grads_close(all_grads(model, inputs), want)


def case_id(case):
    return f"{case[0]}-L{case[1]}"


def exact_state_grads(stream_loss, streams, head):
    """d loss / d x_l for every state of every stream, by plain backprop through the stream;
    stream_loss runs the decomposition forward (models.stream_loss, stream_loss_general)."""
    states = []

    def keep_states(xs):
        states.extend(xs)
        return head(xs)

    loss = stream_loss(streams, keep_states)
    flat = [x for xs in states for x in xs]
    grads = iter(torch.autograd.grad(loss, flat, materialize_grads=True))
    return [[next(grads) for _ in xs] for xs in states]


def fixed_point_iteration(x0, steps, head, k):
    """gamma = 1 Highway-BP written out inline (Wang & Ragni): every g_l is recomputed from the
    previous iterate only, through the full step Jacobian K_l + J_l (the VJP of
    residual(x, *block(x)) in x); no sweep along the chain. Accumulates the gradients into .grad.

    One stream: x0, steps [(block, residual)] as in models_general.py."""
    L = len(steps)
    with torch.no_grad():
        xs = [x0.detach()]
        for block, residual in steps:
            xs.append(residual(xs[-1], *block(xs[-1])))
    xs = [s.clone().requires_grad_() for s in xs]
    loss = head([xs])
    e = list(torch.autograd.grad(loss, xs, retain_graph=True, materialize_grads=True))
    g = [torch.zeros_like(e[0])] + e[1:]  # iterate 0: the injections; nothing has reached x_0 yet
    for _ in range(k):
        g = [
            torch.autograd.grad(residual(xl, *block(xl)), xl, g[l + 1])[0] + (e[l] if l > 0 else 0)
            for l, ((block, residual), xl) in enumerate(zip(steps, xs[:L]))
        ] + [e[L]]
    roots = [loss, x0] + [residual(xl, *block(xl)) for (block, residual), xl in zip(steps, xs[:L])]
    torch.autograd.backward(roots, [torch.ones_like(loss), g[0] + e[0]] + g[1:])


def path_sum(Ws, e, m, k, gamma, As=None):
    """Sum over paths from each injection e_j (j >= m) back to x_m crossing at most k blocks, for
    linear steps x_{l+1} = a_l * x_l + x_l W_l^T (a_l = 1 without As).

    Step l is crossed through the block, w -> w @ W_l + gamma * a_l * w (gamma split), or along
    the residual, w -> (1 - gamma) * a_l * w. Row-vector gradients of shape (B, d).
    """
    As = As if As is not None else [1.0] * len(Ws)
    total = torch.zeros_like(e[m])
    for j in range(m, len(Ws) + 1):
        for n_blocks in range(min(k, j - m) + 1):
            for S in itertools.combinations(range(m, j), n_blocks):
                w = e[j]
                for l in reversed(range(m, j)):
                    w = w @ Ws[l] + gamma * As[l] * w if l in S else (1 - gamma) * As[l] * w
                total = total + w
    return total


def linear_injections(L, m, c0, cm, cL):
    """e_0 .. e_L of the linear test loss c0 . x_0 + cm . x_m + cL . x_L."""
    e = [torch.zeros_like(c0) for _ in range(L + 1)]
    e[L] += cL
    e[m] += cm
    e[0] += c0
    return e


def live_blocks(L: int, k: int, r: int) -> range:
    """The blocks whose round-r VJP can change a gradient, when x_0 needs one (gamma = 0); an
    unbatched backward computes just those (AOTAutograd's CSE and dead-code elimination drop
    the others). Block l reads g^{r-1}_{l+1}, which is final from round L - l - 1 on (the same
    values as the round before: CSE merges the VJPs); its input gradient reaches the outputs
    only through g^r_0..g^r_l, and round r + j reads g^r_j at block j - 1 (dead below k - r)."""
    return range(max(0, k - r), min(L - 1, L - r) + 1)
