"""The pipeline's passes one at a time (hbp_compile/pipeline.py), on small graphs.

For each pass: a graph where it has something to do (what it found or changed), and one where
it has nothing to do (the graph comes out unchanged). The graphs are Dynamo's, recorded by a
backend that compiles nothing, as the hbp backend would receive them.
"""
import copy

import pytest
import torch

from hbp_compile import pipeline
from hbp_compile.backend import HBPBackend
from hbp_compile.config import HBPConfig
from hbp_compile.report import GraphReport
from models import GRUHead, NoResidual, NormStemResMLP, ResMLP, ViewedMLPs
from models_general import PostLNEncoder

aten = torch.ops.aten


def dynamo_graph(model, inputs):
    """(gm, example_inputs) of the first graph the hbp backend hands its pipeline for
    model(*inputs): Dynamo's, with RNN module calls lowered to layers (the rest runs exact)."""
    seen = []

    class Recording(HBPBackend):
        def _rewrite(self, gm, example_inputs, *rest):
            seen.append((copy.deepcopy(gm), list(example_inputs)))
            return None

    torch._dynamo.reset()
    torch.compile(model, backend=Recording(HBPConfig(codegen="eager")))(*inputs)
    return seen[0]


def run_until(model, inputs, last: str, excluded=None, **options):
    """Run the passes up to and including `last`; (graph, context, counts)."""
    gm, example = dynamo_graph(model, inputs)
    counts = {}
    ctx = pipeline.PassContext(HBPConfig(iters=1, **options), example, GraphReport(0, {}),
                               dict(excluded or {}), {},
                               count=lambda name, n=1: counts.__setitem__(
                                   name, counts.get(name, 0) + n))
    for p in pipeline.PASSES:
        gm = p(gm, ctx)
        if p.__name__ == last:
            return gm, ctx, counts
    raise AssertionError(f"no pass {last}")


def targets(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def code_after(model, inputs, before: str, last: str, **options) -> tuple[str, str]:
    """The graph's code before and after the pass `last` (run right after `before`)."""
    gm, ctx, _ = run_until(model, inputs, before, **options)
    code = gm.graph.python_code("self").src
    gm = getattr(pipeline, last)(gm, ctx)
    return code, gm.graph.python_code("self").src


def test_pass_list_is_the_documented_order():
    names = [p.__name__ for p in pipeline.PASSES]
    assert names == ["capture", "split_post_norms", "push_views", "plan", "build_specs",
                     "replace_streams", "replace_rnn_layers", "finalize"]
    for p in pipeline.PASSES:
        assert p.__doc__ and len(p.__doc__.strip().splitlines()) <= 2, p.__name__


def test_capture_decomposes_batch_norm_and_registers_its_inverse():
    model = NormStemResMLP().train()
    gm, ctx, _ = run_until(model, model.example_inputs(), "capture")
    assert aten._native_batch_norm_legit_functional.default in targets(gm)
    assert aten.native_batch_norm.default not in targets(gm)
    assert [name for name, _ in ctx.undo] == ["batch_norms_restored"]


def test_capture_is_a_functional_aten_graph():
    model = ResMLP(n_blocks=2)
    gm, _, _ = run_until(model, model.example_inputs(), "capture")
    ops = targets(gm)
    assert aten.addmm.default in ops or aten.mm.default in ops
    assert not any(getattr(t, "_schema", None) is not None and t._schema.is_mutable for t in ops)


def test_split_post_norms_splits_each_post_ln():
    model = PostLNEncoder(n_layer=2)
    gm, ctx, counts = run_until(model, model.example_inputs(2), "split_post_norms")
    assert counts["post_norms_split"] == 4                     # ln_1, ln_2 of two layers
    assert [name for name, _ in ctx.undo][-1] == "post_norms_restored"


def test_split_post_norms_leaves_pre_ln_alone():
    model = ResMLP(n_blocks=3)
    before, after = code_after(model, model.example_inputs(), "capture", "split_post_norms")
    assert before == after


def test_push_views_moves_adds_onto_the_stream():
    model = ViewedMLPs(n_blocks=4)
    _, _, counts = run_until(model, model.example_inputs(), "push_views")
    assert counts["views_pushed"] >= 1
    _, ctx, _ = run_until(model, model.example_inputs(), "plan")
    assert [len(s.blocks) for s in ctx.segments] == [4]        # one stream through the views


def test_push_views_without_views_changes_nothing():
    model = ResMLP(n_blocks=3)
    before, after = code_after(model, model.example_inputs(), "split_post_norms", "push_views")
    assert before == after


@pytest.mark.parametrize("n", [2, 5])
def test_plan_finds_one_segment_of_n_blocks(n):
    model = ResMLP(n_blocks=n)
    _, ctx, counts = run_until(model, model.example_inputs(), "plan")
    (seg,) = ctx.segments
    assert len(seg.blocks) == n and counts["segments_planned"] == 1
    assert [list(g.members) for g in seg.groups] == [list(range(n))]
    assert not ctx.stop


def test_plan_without_a_stream_stops_the_pipeline():
    model = NoResidual()
    _, ctx, counts = run_until(model, model.example_inputs(), "plan")
    assert ctx.segments == [] and ctx.stop and not counts.get("segments_planned")


def test_plan_leaves_excluded_streams_out():
    model = ResMLP(n_blocks=3)
    first = run_until(model, model.example_inputs(), "plan")[1].segments[0].blocks[0]
    _, ctx, _ = run_until(model, model.example_inputs(), "plan",
                          excluded={first.step.node.name: "excluded"})
    assert ctx.segments == []


@pytest.mark.parametrize("batched", [True, False])
def test_build_specs_splits_each_group_and_decides_batching(batched):
    model = ResMLP(n_blocks=3)
    _, ctx, _ = run_until(model, model.example_inputs(), "build_specs", batched=batched)
    ((seg, spec, caps, flags, reasons),) = ctx.specs
    assert spec.length == 3 and list(flags) == [batched]
    assert all(g.partition is not None for g in seg.groups)    # saved activations, no recompute
    assert reasons == (("",) if batched else ("batching disabled (batched=False)",))
    assert list(ctx.keys.values()) == [seg.blocks[0].step.node.name]


def test_build_specs_with_recompute_keeps_no_partition():
    model = ResMLP(n_blocks=3)
    _, ctx, _ = run_until(model, model.example_inputs(), "build_specs", recompute=True)
    ((seg, spec, *_),) = ctx.specs
    assert all(g.partition is None and g.recompute_reason == "recompute=True"
               for g in seg.groups)


def test_replace_streams_leaves_one_call_per_stream():
    model = ResMLP(n_blocks=4)
    gm, ctx, counts = run_until(model, model.example_inputs(), "replace_streams")
    gm.graph.eliminate_dead_code()
    calls = [n for n in gm.graph.nodes if n.op == "call_function"
             and getattr(n.target, "__name__", "").startswith("hbp_stream_")]
    assert len(calls) == 1
    assert [s.length for s in ctx.report.streams] == [4]
    assert counts["streams_rewritten"] == 1 and counts["blocks_rewritten"] == 4
    assert sum(1 for t in targets(gm) if t is aten.addmm.default) == 1     # the head only


def test_replace_rnn_layers_swaps_each_layer():
    model = GRUHead(layers=2)
    gm, ctx, counts = run_until(model, model.example_inputs(), "replace_rnn_layers")
    assert counts["rnn_layers_rewritten"] == 2
    assert not pipeline.rnn_layers(gm.graph)
    assert [s.length for s in ctx.report.streams] == [5, 5]


def test_replace_rnn_layers_without_rnn_changes_nothing():
    model = ResMLP(n_blocks=3)
    gm, ctx, _ = run_until(model, model.example_inputs(), "replace_streams")
    before = gm.graph.python_code("self").src
    gm = pipeline.replace_rnn_layers(gm, ctx)
    assert gm.graph.python_code("self").src == before and not ctx.stop


def test_finalize_undoes_what_no_stream_took():
    model = NormStemResMLP().train()
    gm, ctx, counts = run_until(model, model.example_inputs(), "finalize")
    assert counts["batch_norms_restored"] == 1                 # the stem's, outside the stream
    assert aten._native_batch_norm_legit_functional.default not in targets(gm)
    assert aten.native_batch_norm.default in targets(gm)


def test_finalize_restores_post_norms_of_an_excluded_stream():
    model = PostLNEncoder(n_layer=2)
    _, ctx, counts = run_until(model, model.example_inputs(2), "finalize",
                               exclude=("*",))
    assert ctx.stop or counts.get("post_norms_restored", 0) == counts["post_norms_split"]


def test_run_passes_times_each_pass_and_stops_early():
    model = ResMLP(n_blocks=3)
    gm, example = dynamo_graph(model, model.example_inputs())
    ctx = pipeline.PassContext(HBPConfig(iters=1), example, GraphReport(0, {}), {}, {})
    assert pipeline.run_passes(gm, ctx) is not None
    assert [k for k in ctx.report.timings] == [f"pass.{p.__name__}_s" for p in pipeline.PASSES]
    model = NoResidual()
    gm, example = dynamo_graph(model, model.example_inputs())
    ctx = pipeline.PassContext(HBPConfig(iters=1), example, GraphReport(0, {}), {}, {})
    assert pipeline.run_passes(gm, ctx) is None
    assert list(ctx.report.timings)[-1] == "pass.plan_s"


def test_each_pass_graph_goes_to_the_structured_trace(monkeypatch):
    import torch._logging as tl

    names = []

    def fake(kind, metadata_fn=None, payload_fn=None, **kw):
        name = metadata_fn()["name"] if kind == "artifact" else ""
        if name.startswith("hbp_after_"):
            names.append(name)
            assert "def forward" in payload_fn()
    monkeypatch.setattr(tl, "trace_structured", fake)
    model = ResMLP(n_blocks=2)
    gm, example = dynamo_graph(model, model.example_inputs())
    ctx = pipeline.PassContext(HBPConfig(iters=1), example, GraphReport(0, {}), {}, {})
    pipeline.run_passes(gm, ctx)
    assert names == [f"hbp_after_{p.__name__}" for p in pipeline.PASSES]
