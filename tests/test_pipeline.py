"""The backend end to end: exact at iters >= L, equal to the eager oracle below, rewrite visible.

Every gradient here is compared with code that shares nothing with the package: plain eager
autograd (Highway-BP must equal it once iters >= L) and tests/oracle.py's eager iteration.
"""
import zlib

import pytest
import torch

from helpers import compiled, exact, max_rel_err, oracle, worst_param
from models import GPT, InjectedHead, Llama, NoResidual, ResMLP, TwoStreams

# name -> (factory, stream lengths the pass must find)
MODELS = {
    "resmlp8": (lambda: ResMLP(n_blocks=8), [8]),
    "resmlp3": (lambda: ResMLP(n_blocks=3), [3]),
    "gpt_L8": (lambda: GPT(n_layer=4), [8]),
    "gpt_L4_tied": (lambda: GPT(n_layer=2, tie_weights=True), [4]),
    "llama_L6": (lambda: Llama(n_layer=3), [6]),
    "two_streams": (lambda: TwoStreams(n_blocks=4), [4, 4]),
    "injected_head": (lambda: InjectedHead(n_blocks=6, tap=3), [6]),
    "injected_head_L5": (lambda: InjectedHead(n_blocks=5, tap=1), [5]),
}


def seeded(*key):
    """A seed per test case: fresh random weights and inputs, reproducible on failure."""
    torch.manual_seed(zlib.crc32(repr(key).encode()))


def build(name, dtype=torch.float64, batch=3):
    factory, lengths = MODELS[name]
    model = factory().to(dtype)
    return model, model.example_inputs(batch), lengths


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("extra", [0, 2])
def test_exact_once_iters_reach_L(name, extra):
    """iters >= L: parameter and input gradients equal eager autograd (float64, rel < 1e-10)."""
    seeded(name, extra)
    model, inputs, lengths = build(name)
    k = max(lengths) + extra
    loss_ref, want = exact(model, inputs)
    loss, got, backend = compiled(model, inputs, k)
    assert [s.length for r in backend.reports for s in r.streams] == lengths
    assert torch.equal(loss, loss_ref)
    assert max_rel_err(got, want) < 1e-10, worst_param(got, want)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("k", [0, 1, 2])
def test_matches_eager_oracle(name, k):
    """iters < L: gradients equal the independent eager iteration in tests/oracle.py."""
    seeded(name, k, "oracle")
    model, inputs, lengths = build(name)
    _, want = oracle(model, inputs, k)
    _, got, backend = compiled(model, inputs, k)
    assert max_rel_err(got, want) < 1e-10, worst_param(got, want)
    # ...and differ from exact backprop, or the comparison above could not fail
    _, exact_grads = exact(model, inputs)
    assert max_rel_err(got, exact_grads) > 1e-6


@pytest.mark.parametrize("name,k", [("resmlp8", 8), ("gpt_L8", 8), ("resmlp8", 1)])
def test_float32(name, k):
    """float32: exact at k = L (rel < 1e-5), oracle at k < L (same tolerance)."""
    seeded(name, k, "f32")
    model, inputs, lengths = build(name, torch.float32, batch=4)
    _, want = exact(model, inputs) if k >= max(lengths) else oracle(model, inputs, k)
    _, got, _ = compiled(model, inputs, k)
    assert max_rel_err(got, want) < 1e-5, worst_param(got, want)


def test_no_residual_stream_falls_back_and_says_so():
    seeded("nores")
    model = NoResidual().double()
    inputs = model.example_inputs(3)
    loss_ref, want = exact(model, inputs)
    loss, got, backend = compiled(model, inputs, 2)
    (report,) = backend.reports
    assert report.streams == [] and report.residual_steps == 0
    assert "no residual stream found" in str(report)
    assert torch.equal(loss, loss_ref)
    assert max_rel_err(got, want) == 0.0


@pytest.mark.parametrize("name", ["gpt_L8", "llama_L6", "injected_head"])
def test_forward_identical_to_exact_compile(name):
    """Only gradients change: the loss is bitwise the loss of an exact aot_eager compile."""
    seeded(name, "fw")
    model, inputs, _ = build(name)
    exact_loss = torch.compile(model, backend="aot_eager")(*inputs)
    torch._dynamo.reset()
    loss, _, _ = compiled(model, inputs, 1)
    assert torch.equal(loss, exact_loss.detach())


def test_report_structure_gpt():
    """A pre-LN GPT: one stream of L = 8, attention and MLP groups, module paths, rounds."""
    seeded("report")
    model, inputs, _ = build("gpt_L8")
    _, _, backend = compiled(model, inputs, 3)
    (report,) = backend.reports
    (stream,) = report.streams
    assert stream.length == 8 and stream.residual_kind == "identity"
    assert report.coverage == 1.0 and report.residual_steps == 8
    assert [g.members for g in stream.groups] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert [b.module_path for b in stream.blocks[:2]] == ["transformer.h.0[ln_1, attn]",
                                                        "transformer.h.0[ln_2, mlp]"]
    # one VJP per group per round, read off the backward graph handed to the code generator
    assert stream.vjps_per_round == {"1": 2, "2": 2, "3": 2, "final": 2}
    text = str(report)
    assert "L=8" in text and "group 0: 4 block(s)" in text and "transformer.h.3[ln_2, mlp]" in text


def test_llama_norm_and_rope_adds_are_not_residual_steps():
    """RMSNorm's + eps and RoPE's q*cos + rot(q)*sin read the stream but are not steps."""
    seeded("llama")
    model, inputs, _ = build("llama_L6")
    _, _, backend = compiled(model, inputs, 1)
    (report,) = backend.reports
    assert report.residual_steps == 6 and [s.length for s in report.streams] == [6]
    assert report.skipped == []


def test_injection_is_reported():
    seeded("inj")
    model, inputs, _ = build("injected_head")
    _, _, backend = compiled(model, inputs, 1)
    assert backend.reports[0].streams[0].injections == [3]


def test_two_streams_are_separate():
    seeded("two")
    model, inputs, _ = build("two_streams")
    _, _, backend = compiled(model, inputs, 1)
    streams = backend.reports[0].streams
    assert len(streams) == 2
    assert streams[0].blocks[0].module_path.startswith("blocks_a.0")
    assert streams[1].blocks[0].module_path.startswith("blocks_b.0")


def test_backward_graph_holds_the_highway_rounds():
    """The rewrite is in AOTAutograd's backward graph (so compiled autograd sees it too)."""
    seeded("bw")
    model, inputs, _ = build("resmlp8")
    _, _, backend = compiled(model, inputs, 2)
    bw = backend.reports[0].graphs["backward"]
    rounds = {n.meta.get("custom", {}).get("hbp_round") for n in bw.graph.nodes} - {None}
    assert rounds == {1, 2, "final"}
    scans = {n.meta.get("custom", {}).get("hbp_scan") for n in bw.graph.nodes} - {None}
    assert scans == {0, 1, 2}                        # round 0 and one scan per round
