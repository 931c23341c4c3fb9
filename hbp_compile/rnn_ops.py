"""hbp::rnn_layer: one layer, one direction of nn.RNN / nn.GRU / nn.LSTM as ONE opaque op.

ATen's RNN ops are CompositeImplicitAutograd: traced by make_fx (so by AOTAutograd), a GRU
over T steps becomes T copies of the cell, and compile time grows with T (float32 LSTMs on a
CPU become aten.mkldnn_rnn_layer, which AOTAutograd cannot save for backward). A custom op is
opaque to every tracer: the compiled forward calls ATen's own kernel (CPU or cuDNN) once per
layer and direction, whatever T is.

Its autograd formula is exact backprop (used where the pass leaves a layer exact): the
backward op reruns the layer under autograd at run time, also opaque. The Highway-BP path
(rewrite/highway_rnn.py) calls the forward op inside its own autograd.Function instead.

Layout, time-major and one direction: x (T, B, I); hx = [h_0 (B, H)] or [h_0, c_0] for an
LSTM; params = [w_ih, w_hh] (+ [b_ih, b_hh]) (+ [w_hr] with an LSTM projection).
Returns [out (T, B, H_out), h_T (B, H_out)] (+ [c_T (B, H)] for an LSTM).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

def _aten_layer(mode: str, x: Tensor, hx: list[Tensor], params: list[Tensor],
                has_biases: bool, train: bool) -> list[Tensor]:
    """The ATen RNN op for one layer and direction (num_layers=1, no dropout)."""
    op = getattr(torch, mode)
    h = [t.unsqueeze(0) for t in hx]
    if mode == "lstm":
        out, h_T, c_T = op(x, h, params, has_biases, 1, 0.0, train, False, False)
        return [out, h_T[0], c_T[0]]
    out, h_T = op(x, h[0], params, has_biases, 1, 0.0, train, False, False)
    return [out, h_T[0]]


@torch.library.custom_op("hbp::rnn_layer", mutates_args=())
def rnn_layer(mode: str, x: Tensor, hx: list[Tensor], params: list[Tensor],
              has_biases: bool, train: bool) -> list[Tensor]:
    with torch.no_grad():
        return [t.contiguous() for t in _aten_layer(mode, x, hx, params, has_biases, train)]


@rnn_layer.register_fake
def _(mode, x, hx, params, has_biases, train):
    T, B = x.shape[:2]
    h_out = params[-1].shape[0] if mode == "lstm" and len(params) in (3, 5) else hx[0].shape[-1]
    outs = [x.new_empty(T, B, h_out), x.new_empty(B, h_out)]
    return outs + ([x.new_empty(hx[1].shape)] if mode == "lstm" else [])


@torch.library.custom_op("hbp::rnn_layer_backward", mutates_args=())
def rnn_layer_backward(mode: str, x: Tensor, hx: list[Tensor], params: list[Tensor],
                       has_biases: bool, train: bool, grads: list[Tensor]) -> list[Tensor]:
    """Exact gradients of rnn_layer in (x, *hx, *params): the layer rerun under autograd."""
    leaves = [t.detach().requires_grad_(t.dtype.is_floating_point) for t in (x, *hx, *params)]
    with _autograd_below_dispatch(), torch.enable_grad():
        outs = _aten_layer(mode, leaves[0], leaves[1:1 + len(hx)], leaves[1 + len(hx):],
                           has_biases, train)
        got = torch.autograd.grad(outs, leaves, grads, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(got, leaves)]


def _autograd_below_dispatch():
    """Re-enable autograd inside an op's kernel (the dispatcher excludes its keys there);
    autocast stays excluded, as in the forward kernel."""
    K = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (K.AutogradFunctionality, K.AutogradOther, K.AutogradNestedTensor,
                K.ADInplaceOrView):
        exclude = exclude.remove(key)
    include = torch._C._dispatch_tls_local_include_set().remove(K.ADInplaceOrView)
    return torch._C._ForceDispatchKeyGuard(include, exclude)


@rnn_layer_backward.register_fake
def _(mode, x, hx, params, has_biases, train, grads):
    return [torch.empty_like(t) for t in (x, *hx, *params)]


def _setup_context(ctx, inputs, output):
    mode, x, hx, params, has_biases, train = inputs
    ctx.args = (mode, has_biases, train, len(hx))
    ctx.save_for_backward(x, *hx, *params)


def _backward(ctx, grads):
    mode, has_biases, train, n_h = ctx.args
    x, *rest = ctx.saved_tensors
    hx, params = rest[:n_h], rest[n_h:]
    got = rnn_layer_backward(mode, x, list(hx), list(params), has_biases, train, list(grads))
    return None, got[0], got[1:1 + n_h], got[1 + n_h:], None, None


rnn_layer.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("hbp::reverse_linear_scan", mutates_args=())
def reverse_linear_scan(a: Tensor, k: Tensor, form: str, v: Optional[Tensor] = None) -> Tensor:
    """g_t = a_t (+ v_t) + k_t g_{t+1} along dim 0, as ONE op run eagerly (rewrite.scan's
    `form`); v (n - 1 rows, optional) is added to a's first rows inside, one pass less.

    Inside an Inductor graph the scan's chain of pointwise steps is inlined into its
    consumers, and each of its T outputs then recomputes its chain and everything feeding k
    (measured: two kernels of 37 and 49 ms in a 175 ms GRU backward at T = 1024); run as its
    own kernels it reads k and a once. On a CPU the plain recurrence in place is the cheapest
    (n fused multiply-adds of one row each, no extra passes over the stream); on a GPU the
    form rewrite.scan.choose_scan picked (log-depth: few launches)."""
    g = a.clone(memory_format=torch.contiguous_format)
    if v is not None:
        g[:-1] += v
    if a.device.type == "cpu" or form == "sequential":
        rows, ks = g.unbind(0), k.unbind(0)          # views made once, not per step
        for t in range(len(rows) - 2, -1, -1):
            rows[t].addcmul_(ks[t], rows[t + 1])
        return g
    from .rewrite.scan import reverse_scan
    return reverse_scan(g, k, "log-depth" if form == "op" else form).contiguous()


@reverse_linear_scan.register_fake
def _(a, k, form, v=None):
    return torch.empty_like(a, memory_format=torch.contiguous_format)


@torch.library.custom_op("hbp::stack", mutates_args=())
def stack(tensors: list[Tensor]) -> Tensor:
    """torch.stack as ONE opaque op. Inductor lowers a stack of n tensors to n copy kernels,
    generated and compiled one by one: stacking 256 per-step tensors in the backward of a cell
    loop made its compile time grow with T. Called with its own output, it copies once."""
    return torch.stack(tensors)


@stack.register_fake
def _(tensors):
    return tensors[0].new_empty((len(tensors), *tensors[0].shape))
