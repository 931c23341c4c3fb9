"""Stacked GRU layers over time with residual connections between layers (the paper's 3-layer
GRU): one stream over time per layer; the between-layer adds stay outside, as injections.

Oracle: eager autograd (k >= T), and tests/oracle_general.py run layer by layer from the top:
each layer's Highway-BP gradients at its inputs become the injections of the layer below.
"""
import copy

import pytest
import torch

from helpers import compiled, exact, grads_of, max_rel_err, worst_param
from models_rnn import StackedGRU
from oracle_general import highway_backward_general


def layerwise_oracle(model, x, k):
    """Highway-BP per layer, top layer first; returns gradients like helpers.grads_of."""
    m = copy.deepcopy(model)
    x = x.detach().clone().requires_grad_(True)
    B = x.size(0)
    u0 = [m.proj(x[:, t]) for t in range(x.size(1))]            # prelude, attached
    inputs = [[u.detach().requires_grad_(True) for u in u0]]    # per layer: leaf inputs
    for layer in m.layers:                                      # forward, layer by layer
        h, outs = layer.h0.expand(B, -1), []
        with torch.no_grad():
            for u_t in inputs[-1]:
                h = layer.update(h, *layer.gates(u_t, h))
                outs.append(h)
        inputs.append([(u + o).detach().requires_grad_(True) for u, o in zip(inputs[-1], outs)])

    top = inputs[-1]
    loss = m.head(top[-1]).pow(2).mean()
    loss.backward()                                              # the head's parameters
    cot = [torch.zeros_like(u) for u in top[:-1]] + [top[-1].grad]
    for li in range(len(m.layers) - 1, -1, -1):
        layer, us = m.layers[li], inputs[li]
        steps = [(lambda h, u_t=u_t, layer=layer: layer.gates(u_t, h), layer.update) for u_t in us]

        def head(states, us=us, cot=cot):
            # u^{l+1}_t = u^l_t + h_t: the layer above's gradient enters at h_t and at u^l_t
            return sum((c * (h + u)).sum() for c, h, u in zip(cot, states[0][1:], us))

        highway_backward_general([(layer.h0.expand(B, -1), steps)], head, k)
        cot = [u.grad for u in us]
    torch.autograd.backward(u0, cot)
    return loss.detach(), grads_of(m, [x])


@pytest.mark.parametrize("layers,T", [(3, 6), (2, 5)])
def test_one_stream_per_layer_exact_at_T(layers, T):
    torch.manual_seed(layers * 10 + T)
    model = StackedGRU(layers=layers, T=T).double()
    inputs = model.example_inputs()
    _, want = exact(model, inputs)
    _, got, backend = compiled(model, inputs, T)
    (report,) = backend.reports
    assert [s.length for s in report.streams] == [T] * layers
    assert all(s.residual_kind.startswith("gated") for s in report.streams)
    assert all(len(s.groups) <= 2 and s.groups[-1].batched for s in report.streams)
    assert max_rel_err(got, want) < 1e-10, worst_param(got, want)


@pytest.mark.parametrize("k", [0, 1, 2])
def test_matches_the_layerwise_oracle(k):
    torch.manual_seed(k)
    model = StackedGRU().double()
    inputs = model.example_inputs()
    loss_want, want = layerwise_oracle(model, inputs[0], k)
    loss, got, _ = compiled(model, inputs, k)
    torch.testing.assert_close(loss, loss_want, rtol=1e-12, atol=0)
    assert max_rel_err(got, want) < 1e-10, worst_param(got, want)
    _, exact_grads = exact(model, inputs)
    assert max_rel_err(got, exact_grads) > 1e-6


def test_layerwise_oracle_is_exact_at_T():
    """The oracle's own check: at k = T every layer's iteration is exact backprop."""
    torch.manual_seed(5)
    model = StackedGRU().double()
    inputs = model.example_inputs()
    _, want = exact(model, inputs)
    _, got = layerwise_oracle(model, inputs[0], model.T)
    assert max_rel_err(got, want) < 1e-10, worst_param(got, want)
