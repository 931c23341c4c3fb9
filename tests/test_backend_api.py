"""The user-facing surface: option validation, backend="hbp", strict mode, dumps, fallbacks."""
import json

import pytest
import torch

import hbp_compile
from hbp_compile import hbp_backend
from helpers import assert_exact, compiled, exact, max_rel_err, worst_param
from models import ResMLP
from models_general import PostNorm
from models_noisy import NoisyBlocks


@pytest.mark.parametrize("kwargs", [
    dict(iters=-1), dict(iters=1.5), dict(iters=True), dict(iters="3"),
    dict(iters=2, gamma=-0.1), dict(iters=2, gamma=1.5), dict(iters=2, gamma="0.2"),
    dict(iters=2, codegen="triton"), dict(iters=2, strict="yes"),
])
def test_bad_options_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        hbp_backend(**kwargs)


def test_good_options_and_cache_key():
    a, b = hbp_backend(iters=2), hbp_backend(iters=3)
    assert a.config.cache_key() != b.config.cache_key()
    assert hbp_backend(iters=2, gamma=1).config.gamma == 1.0
    assert hbp_backend(iters=2, dump_dir="/tmp/x").config.cache_key() == a.config.cache_key()


def test_string_backend_through_entry_point():
    """torch.compile(m, backend="hbp", options={...}) resolves our entry point."""
    torch.manual_seed(1)
    model = ResMLP(n_blocks=4).double()
    (x,) = model.example_inputs(3)
    _, want = exact(model, (x,))
    cm = torch.compile(model, backend="hbp", options={"iters": 4, "codegen": "eager"})
    cm(x).backward()
    got = {n: p.grad for n, p in model.named_parameters()}
    want.pop("input.0")
    assert max_rel_err(got, want) < 1e-10
    report = hbp_compile.string_backend(iters=4, codegen="eager").reports[-1]
    assert [s.length for s in report.streams] == [4]


def test_unsupported_block_splits_stream_and_reports_why():
    """A random op inside block 2: the stream is cut there, block 2 runs exact backprop."""
    torch.manual_seed(2)
    model = NoisyBlocks(n=6).double()
    x = torch.randn(3, 8, dtype=torch.double)
    _, _, backend = compiled(model, (x,), 1)
    (report,) = backend.reports
    assert [s.length for s in report.streams] == [2, 3]
    (skip,) = report.skipped
    assert "random op" in skip.reason and "block 2" in skip.reason
    assert report.coverage == pytest.approx(5 / 6)
    assert "not rewritten" in str(report)


def test_lone_block_left_to_exact_backprop_by_default():
    """A segment of one block (NoisyBlocks(4): blocks 0-1, [2 cut], 3) stays exact; min_length=1
    rewrites it."""
    torch.manual_seed(2)
    model = NoisyBlocks().double()
    x = torch.randn(3, 8, dtype=torch.double)
    _, _, backend = compiled(model, (x,), 1)
    (report,) = backend.reports
    assert [s.length for s in report.streams] == [2]
    assert any("shorter than min_length=2" in s.reason for s in report.skipped)
    torch._dynamo.reset()
    _, _, backend = compiled(model, (x,), 1, min_length=1)
    assert [s.length for s in backend.reports[0].streams] == [2, 1]


def test_unsupported_block_is_exact_at_iters_ge_segment_length():
    torch.manual_seed(3)
    model = NoisyBlocks().double()
    x = torch.randn(3, 8, dtype=torch.double)
    torch.manual_seed(10)
    _, want = exact(model, (x,))
    torch.manual_seed(10)
    _, got, _ = compiled(model, (x,), 2)
    assert max_rel_err(got, want) < 1e-10, worst_param(got, want)


def test_strict_raises_naming_node_and_reason():
    model = NoisyBlocks().double()
    x = torch.randn(3, 8, dtype=torch.double)
    cm = torch.compile(model, backend=hbp_backend(iters=1, codegen="eager", strict=True))
    with pytest.raises(Exception, match=r"%add_\d+.*random op"):
        cm(x)


def test_dump_dir_writes_graphs_and_report(tmp_path):
    torch.manual_seed(4)
    model = ResMLP(n_blocks=3).double()
    (x,) = model.example_inputs(2)
    compiled(model, (x,), 1, dump_dir=str(tmp_path))
    names = sorted(p.name for p in tmp_path.iterdir())
    for part in ("captured", "joint_original", "rewritten", "joint", "forward", "backward"):
        assert f"graph_0_{part}.py" in names
    assert "hbp_stream_0_0" in (tmp_path / "graph_0_rewritten.py").read_text()
    assert "def forward" in (tmp_path / "graph_0_backward.py").read_text()
    data = json.loads((tmp_path / "graph_0_report.json").read_text())
    assert data["streams"][0]["length"] == 3 and data["coverage"] == 1.0
    assert "L=3" in (tmp_path / "graph_0_report.txt").read_text()


def test_failure_during_compile_falls_back_with_reason(monkeypatch):
    """If compiling the rewritten graph fails, the graph runs exact backprop and says why."""
    from hbp_compile.rewrite import highway_stream

    def broken(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(highway_stream.HighwayStream, "backward", staticmethod(broken))
    torch.manual_seed(5)
    model = ResMLP(n_blocks=3).double()
    (x,) = model.example_inputs(2)
    _, want = exact(model, (x,))
    _, got, backend = compiled(model, (x,), 1)
    (report,) = backend.reports
    assert "injected failure" in report.fallback_reason and not report.rewritten
    assert "exact backprop (fallback" in str(report)
    assert max_rel_err(got, want) == 0.0


@pytest.mark.parametrize("post,k,tol", [("ln", 3, 1e-10), ("rms", 0, 0)])
def test_post_norm_stream_exact(post, k, tol):
    """Post-LN: one stream, exact at k = L. Post-RMSNorm: each x + f(x) is a lone step, the
    report names the op the stream passes through, and the gradients are exact bit for bit."""
    torch.manual_seed(9)
    model = PostNorm(post).double()
    x = torch.randn(3, 8, dtype=torch.double)
    (report,) = assert_exact(model, (x,), k, tol=tol).reports
    if post == "ln":
        assert [(s.length, s.residual_kind) for s in report.streams] == [(3, "post-LN")]
    else:
        assert report.streams == [] and report.residual_steps == 3
        assert any("the stream passes through aten." in s.reason for s in report.skipped), report


def test_deep_recursion_is_scoped():
    """The compile raises the recursion limit (Inductor recurses along long RNN chains) and
    puts it back."""
    import sys

    from hbp_compile.codegen import deep_recursion

    before = sys.getrecursionlimit()
    with deep_recursion(before + 5000):
        assert sys.getrecursionlimit() == before + 5000
    assert sys.getrecursionlimit() == before


@pytest.mark.inductor
def test_mode_and_inductor_options_reach_inductor_for_both_graphs():
    """mode= sets Inductor's config as torch.compile's mode does (reduce-overhead: CUDA graphs,
    skipped on a CPU), inductor_options= patches it; the backward, compiled at the first
    backward call, sees them too."""
    import uuid

    from torch._inductor.custom_graph_pass import CustomGraphPass

    seen = []

    class Spy(CustomGraphPass):
        def __call__(self, graph):
            seen.append(torch._inductor.config.triton.cudagraphs)

        def uuid(self):
            return f"spy-{key}"            # a fresh key: no FX-graph cache hit skips the pass

    key = uuid.uuid4().hex
    torch.manual_seed(0)
    model = ResMLP(n_blocks=3)
    backend = hbp_backend(iters=1, mode="reduce-overhead",
                          inductor_options={"post_grad_custom_post_pass": Spy()})
    torch.compile(model, backend=backend)(*model.example_inputs(2)).backward()
    assert seen == [True, True]                       # forward and backward graphs
    assert backend.reports[0].rewritten_blocks == 3
    with pytest.raises(ValueError, match="mode"):
        hbp_backend(iters=1, mode="fast")
    with pytest.raises(ValueError, match="inductor_options"):
        hbp_backend(iters=1, inductor_options=[1, 2])


def test_a_stream_that_fails_to_build_runs_exact_and_the_others_stay_rewritten(monkeypatch):
    """Fault injection: building the first stream's backward raises (once). That stream is left
    exact (the report says why), the graph is compiled again, the second stream stays
    rewritten, and the gradients are exact at k >= L."""
    from hbp_compile.rewrite.highway_stream import HighwayStream
    from models import TwoStreams

    real, failed = HighwayStream._backward, []

    def failing(ctx, *grads):
        if not failed:
            failed.append(ctx.spec.name)
            raise RuntimeError("injected failure")
        return real(ctx, *grads)

    monkeypatch.setattr(HighwayStream, "_backward", staticmethod(failing))
    counters = torch._dynamo.utils.counters["hbp_compile"]
    before = dict(counters)
    torch.manual_seed(3)
    model = TwoStreams(n_blocks=3).double()
    inputs = model.example_inputs(3)
    _, want = exact(model, inputs)
    _, got, backend = compiled(model, inputs, 3)
    (report,) = backend.reports
    assert report.fallback_reason is None
    assert [s.length for s in report.streams] == [3]
    (why,) = [s.reason for s in report.skipped if "injected failure" in s.reason]
    assert "runs exact backprop, the others stay rewritten" in why
    # counted once: the failed attempt's streams are not (only the compile that stands)
    for name, n in [("streams_isolated", 1), ("streams_rewritten", 1), ("blocks_rewritten", 3)]:
        assert counters[name] == before.get(name, 0) + n, name
    assert max_rel_err(got, want) < 1e-10, worst_param(got, want)


@pytest.mark.parametrize("exclude,kept", [("transformer.h.1.*", [2, 3]),
                                          (["*h.0.attn*", "*.h.2.mlp*"], [0, 5])])
def test_exclude_keeps_chosen_blocks_exact(exclude, kept):
    """exclude= module-path patterns: matching blocks run exact backprop (the stream is cut
    around them), the report names pattern and module, strict mode does not object, and the
    gradients stay exact at k >= L."""
    from models import GPT

    torch.manual_seed(6)
    model = GPT(n_layer=3).double()
    inputs = model.example_inputs(2)
    _, want = exact(model, inputs)
    _, got, backend = compiled(model, inputs, 6, exclude=exclude, strict=True)
    (report,) = backend.reports
    excluded = [s for s in report.skipped if "kept exact by exclude=" in s.reason]
    assert len(excluded) == len(kept), str(report)
    assert sum(s.length for s in report.streams) == 6 - len(kept)
    assert max_rel_err(got, want) < 1e-10, worst_param(got, want)


@pytest.mark.parametrize("first,last", [(1, 0), (0, 2), (2, 1)])
def test_exact_first_and_last_keep_the_ends_of_each_stream_exact(first, last):
    """exact_first / exact_last: those blocks of a stream run exact backprop, the report says
    so, strict mode does not object, the gradients are exact at k >= L and not at k = 1."""
    from models import GPT

    torch.manual_seed(7)
    model = GPT(n_layer=3).double()
    inputs = model.example_inputs(2)
    _, want = exact(model, inputs)
    _, got, backend = compiled(model, inputs, 6, exact_first=first, exact_last=last,
                               strict=True)
    (report,) = backend.reports
    kept = [s.reason for s in report.skipped if "kept exact by exact_" in s.reason]
    assert len(kept) == first + last, str(report)
    assert [s.length for s in report.streams] == [6 - first - last], str(report)
    assert max_rel_err(got, want) < 1e-10, worst_param(got, want)
    _, approx, _ = compiled(model, inputs, 1, exact_first=first, exact_last=last)
    assert max_rel_err(approx, want) > 1e-6
