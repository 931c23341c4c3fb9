"""Dropout inside blocks: the forward draws each mask once and every VJP of the backward reads it.

Oracle: eager autograd under the same seed (k >= L), and the eager iteration of tests/oracle.py
on the same model with the masks the forward drew, recorded from the compiled run's forward
by a dispatch mode and replayed by the oracle's blocks (k < L).
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import clone_inputs, compiled, exact, grads_of, max_rel_err, worst_param
from models_noisy import DropMLP
from oracle import highway_backward


class RecordDraws(TorchDispatchMode):
    """Collect the outputs of random draws (bernoulli) in call order."""

    def __init__(self):
        super().__init__()
        self.draws = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.bernoulli.p, torch.ops.aten.bernoulli_.float):
            self.draws.append(out.detach().clone())
        return out


def build(native=False, seed=0):
    torch.manual_seed(seed)
    model = DropMLP(native=native).double()
    return model, (torch.randn(6, model.d, dtype=torch.double),)


@pytest.mark.parametrize("native", [False, True], ids=["F.dropout", "native_dropout"])
@pytest.mark.parametrize("batched", [True, False])
def test_exact_at_L_with_the_same_masks(native, batched):
    model, inputs = build(native)
    torch.manual_seed(123)
    _, want = exact(model, inputs)
    torch.manual_seed(123)
    _, got, backend = compiled(model, inputs, len(model.blocks), batched=batched)
    (stream,) = backend.reports[0].streams
    assert stream.length == 4
    assert "2 random draw(s) saved" in stream.groups[0].summary
    assert max_rel_err(got, want) < 1e-12, worst_param(got, want)
    # the masks are live: a different seed gives other gradients
    torch.manual_seed(7)
    _, other = exact(model, inputs)
    assert max_rel_err(other, want) > 1e-3


@pytest.mark.parametrize("k", [0, 1, 2])
def test_matches_oracle_with_replayed_masks(k):
    model, inputs = build(seed=k)
    rec = RecordDraws()                   # the masks eager draws under seed 123 ...
    torch.manual_seed(123)
    with rec, torch.no_grad():
        copy.deepcopy(model)(*inputs)
    assert len(rec.draws) == 2 * len(model.blocks)
    torch.manual_seed(123)                # ... are the compiled forward's (its loss says so)
    loss, got, backend = compiled(model, inputs, k)
    assert backend.reports[0].streams[0].length == len(model.blocks)

    ref = copy.deepcopy(model)
    for l, blk in enumerate(ref.blocks):
        blk.replay = rec.draws[2 * l], rec.draws[2 * l + 1]
    ys = clone_inputs(inputs)
    streams, head = ref.stream_view(*ys)
    ref_loss, _ = highway_backward(streams, head, k)
    want = grads_of(ref, ys)
    assert torch.allclose(ref_loss, loss, rtol=1e-12, atol=0)
    assert max_rel_err(got, want) < 1e-10, worst_param(got, want)
    _, exact_grads = exact(ref, inputs)
    assert max_rel_err(got, exact_grads) > 1e-6


def test_attention_dropout_in_the_math_path_is_saved():
    """SDPA with dropout_p > 0 on CPU runs its math form: the attention-probability mask is a
    draw like any other, saved by the forward."""

    class Attn(nn.Module):
        def __init__(self, d=8):
            super().__init__()
            self.qkv = nn.Linear(d, 3 * d)

        def forward(self, x):
            q, k, v = self.qkv(x).unsqueeze(1).chunk(3, -1)
            return F.scaled_dot_product_attention(q, k, v, dropout_p=0.5).squeeze(1)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(Attn() for _ in range(3))

        def forward(self, x):
            for b in self.blocks:
                x = x + b(x)
            return x.pow(2).mean()

    torch.manual_seed(0)
    model = Model().double()
    inputs = (torch.randn(2, 5, 8, dtype=torch.double),)
    torch.manual_seed(1)
    _, want = exact(model, inputs)
    torch.manual_seed(1)
    _, got, backend = compiled(model, inputs, 3)
    (stream,) = backend.reports[0].streams
    assert stream.length == 3 and "1 random draw(s) saved" in stream.groups[0].summary
    assert max_rel_err(got, want) < 1e-12, worst_param(got, want)


def test_a_draw_inside_a_fused_kernel_cannot_be_saved():
    """A fused attention kernel with dropout_p > 0 (CUDA's) draws inside the op: BlockError."""
    from hbp_compile.analysis.blocks import BlockError, _check_op

    g = torch.fx.Graph()
    q, k, v = (g.placeholder(n) for n in "qkv")
    op = torch.ops.aten._scaled_dot_product_efficient_attention.default
    on = g.call_function(op, (q, k, v, None, True, 0.1))
    off = g.call_function(op, (q, k, v, None, True, 0.0))
    with pytest.raises(BlockError, match="cannot be saved"):
        _check_op(on)
    _check_op(off)
