"""Glue between the package and the oracle: compile, run one backward, collect gradients."""
import copy

import torch

from hbp_compile import hbp_backend
from oracle import highway_backward, param_grads


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


def assert_exact(model, inputs, k, tol=1e-10, **options):
    """Compiled Highway-BP at k (>= L) equals eager autograd; returns the backend."""
    _, want = exact(model, inputs)
    _, got, backend = compiled(model, inputs, k, **options)
    assert max_rel_err(got, want) < tol, worst_param(got, want)
    return backend


def assert_matches_general_oracle(model, inputs, k, tol=1e-10, **view):
    """Compiled Highway-BP at k equals oracle_general's, and differs from exact backprop (so
    the comparison could fail); returns the backend (for its report)."""
    _, want = oracle_general(model, inputs, k, **view)
    _, got, backend = compiled(model, inputs, k)
    assert max_rel_err(got, want) < tol, worst_param(got, want)
    assert max_rel_err(got, exact(model, inputs)[1]) > 1e-6
    return backend
