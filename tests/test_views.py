"""Streams through views (analysis/views.py): the stream goes on where a model reshapes or
transposes it between residual adds (OPT's decoder layer flattens it to 2-D for its MLP).

Models here write the view; their stream_view writes the same function without it (each block
reshapes inside), so the oracle (tests/oracle_general.py) sees one shape per stream. Checked:
the stream is one chain of all the adds, the report names the views, k = 1 equals the oracle,
k >= L equals exact autograd (float64, several depths).
"""
import pytest
import torch
import torch.nn as nn

from helpers import assert_exact, assert_matches_general_oracle, compiled
from models_general import FlattenedMLPs, TransposedBlocks, mlp


MODELS = [FlattenedMLPs, TransposedBlocks]


@pytest.mark.parametrize("cls", MODELS)
@pytest.mark.parametrize("n", [2, 3])
def test_stream_goes_through_views(cls, n):
    torch.manual_seed(n)
    model = cls(n).double()
    inputs = model.example_inputs(3)
    backend = assert_matches_general_oracle(model, inputs, 1)
    (report,) = backend.reports
    (stream,) = report.streams
    assert stream.length == 2 * n and report.coverage == 1.0, str(report)
    assert stream.views and "stream continues through views" in str(report), str(report)
    assert_exact(model, inputs, 2 * n)


def test_a_stream_that_starts_at_a_view_keeps_its_blocks():
    """A view before the first add is the stream's x_0 itself: nothing to move."""
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = nn.ModuleList(mlp(8) for _ in range(3))

        def forward(self, x):
            x = x.reshape(-1, 8)
            for m in self.m:
                x = x + m(x)
            return x.square().mean()

    torch.manual_seed(0)
    model = Flat().double()
    _, _, backend = compiled(model, (torch.randn(2, 4, 8, dtype=torch.float64),), 1)
    (stream,) = backend.reports[0].streams
    assert stream.length == 3 and not stream.views


def test_views_with_symbolic_sizes():
    """dynamic=True: the inverse views reshape to symbolic sizes (sym_size nodes); one graph
    serves two batch sizes, the stream goes through the views, exact at k = L."""
    import copy

    from hbp_compile import hbp_backend
    from helpers import exact, max_rel_err

    torch.manual_seed(0)
    model = FlattenedMLPs(2).double()
    backend = hbp_backend(iters=4, codegen="eager")
    for batch in (3, 5):
        x = torch.randn(batch, 5, 8, dtype=torch.float64)
        m = copy.deepcopy(model)
        torch.compile(m, backend=backend, dynamic=True)(x).backward()
        (stream,) = backend.reports[-1].streams
        assert stream.length == 4 and stream.views, str(backend.reports[-1])
        got = {n: p.grad for n, p in m.named_parameters()}
        want = {n: g for n, g in exact(model, (x,))[1].items() if n in got}   # not x's
        assert max_rel_err(got, want) < 1e-10
