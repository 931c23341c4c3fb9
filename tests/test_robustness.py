"""What a torch.compile user does beyond one forward/backward: dynamic shapes, compiled
autograd, BatchNorm buffers, graph breaks, tied weights, inference, caches."""
import copy

import pytest
import torch

from helpers import compiled, exact, max_rel_err, oracle, worst_param
from hbp_compile import hbp_backend
from models import GPT, BNOutside, BNResNet, BreakInLoopMLP, BreakMLP, ResMLP


@pytest.mark.parametrize("factory", [lambda: ResMLP(n_blocks=5), lambda: GPT(n_layer=2)],
                         ids=["resmlp", "gpt"])
def test_dynamic_shapes_one_graph_two_batch_sizes(factory):
    """dynamic=True: the rewrite keeps the batch size symbolic (no recompile per size)."""
    torch.manual_seed(0)
    model = factory().double()
    backend = hbp_backend(iters=2, codegen="eager", batched=True)
    cm = torch.compile(copy.deepcopy(model), backend=backend, dynamic=True)
    for batch in (3, 7):
        inputs = model.example_inputs(batch)
        _, want = oracle(model, inputs, 2)
        cm.zero_grad()
        xs = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
        cm(*xs).backward()
        got = {n.replace("_orig_mod.", ""): p.grad for n, p in cm.named_parameters()}
        got.update({f"input.{i}": t.grad for i, t in enumerate(xs) if t.requires_grad})
        assert max_rel_err(got, want) < 1e-10, worst_param(got, want)
    assert len(backend.reports) == 1                      # one symbolic graph served both
    assert all(g.batched for g in backend.reports[0].streams[0].groups)


@pytest.mark.parametrize("batched", [False, True])
def test_bf16_autocast(batched):
    """An fp32 stream with bf16 blocks (the add promotes): found and exact at k = L.

    Unbatched, the backward runs the same bf16 kernels as an exact compile: identical.
    Batched, a round's matmuls are bmm over the blocks, which round differently in bf16:
    equal to bf16 precision (eps 7.8e-3), not bitwise.
    """
    torch.manual_seed(7)
    model = ResMLP(n_blocks=4)
    (x,) = model.example_inputs(4)

    def grads(backend):
        m = copy.deepcopy(model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.compile(m, backend=backend)(x).backward()
        torch._dynamo.reset()
        return {n: p.grad for n, p in m.named_parameters()}

    want = grads("aot_eager")
    backend = hbp_backend(iters=4, codegen="eager", batched=batched)
    got = grads(backend)
    assert [s.length for s in backend.reports[0].streams] == [4]
    assert max_rel_err(got, want) < (2e-2 if batched else 1e-12), worst_param(got, want)


def test_compiled_autograd_runs_the_highway_backward():
    """Compiled autograd retraces AOTAutograd's backward graph, which holds the rewrite."""
    torch.manual_seed(1)
    model = ResMLP(n_blocks=6).double()
    inputs = model.example_inputs(3)
    _, want = oracle(model, inputs, 2)
    with torch._dynamo.config.patch(compiled_autograd=True):
        _, got, _ = compiled(model, inputs, 2)
    assert max_rel_err(got, want) < 1e-10, worst_param(got, want)


@pytest.mark.parametrize("k", [1, 4])
def test_batchnorm_buffers_identical_and_grads_right(k):
    torch.manual_seed(2)
    model = BNResNet().double()
    x = torch.randn(6, 8, dtype=torch.double)
    ref = copy.deepcopy(model)
    _, want = exact(ref, (x,)) if k >= 4 else oracle(ref, (x,), k)
    m = copy.deepcopy(model)
    backend = hbp_backend(iters=k, codegen="eager", batched=True)
    loss = torch.compile(m, backend=backend)(x.clone().requires_grad_(True))
    loss.backward()
    exact_model = copy.deepcopy(model)
    exact_model(x)                                   # one eager forward updates its buffers
    for (name, b), b_ref in zip(m.named_buffers(), exact_model.buffers()):
        assert torch.equal(b, b_ref), name
        assert b.grad_fn is None, name
    got = {n: p.grad for n, p in m.named_parameters()}
    want.pop("input.0")
    assert max_rel_err(got, want) < 1e-10, worst_param(got, want)
    assert backend.reports[0].streams[0].length == 4


def test_graph_break_in_loop_is_reported_not_hidden():
    torch.manual_seed(6)
    model = BreakInLoopMLP(n_blocks=5).double()
    inputs = model.example_inputs(3)
    _, want = exact(model, inputs)
    _, got, backend = compiled(model, inputs, 1)
    assert all(r.streams == [] for r in backend.reports)
    assert all("no residual stream found" in str(r) for r in backend.reports)
    assert max_rel_err(got, want) == 0.0


def test_graph_break_each_graph_is_its_own_stream():
    torch.manual_seed(3)
    model = BreakMLP(n_blocks=7).double()
    inputs = model.example_inputs(3)
    _, want = exact(model, inputs)
    _, got, backend = compiled(model, inputs, 4)     # 4 >= both segments (3 and 4 blocks)
    lengths = sorted(s.length for r in backend.reports for s in r.streams)
    assert lengths == [3, 4]
    assert max_rel_err(got, want) < 1e-10, worst_param(got, want)


def test_inference_under_no_grad_matches_exact():
    torch.manual_seed(4)
    model = GPT(n_layer=2).double()
    inputs = model.example_inputs(2)
    with torch.no_grad():
        want = model(*inputs)
        got = torch.compile(model, backend=hbp_backend(iters=1, codegen="eager"))(*inputs)
    assert torch.equal(got, want)


def test_second_step_reuses_the_compiled_graph():
    """Two training steps with an optimizer: one compile, the second step's grads still right."""
    torch.manual_seed(5)
    model = ResMLP(n_blocks=4).double()
    ref = copy.deepcopy(model)
    backend = hbp_backend(iters=1, codegen="eager")
    cm = torch.compile(model, backend=backend)
    opt, opt_ref = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, ref))
    for step in range(2):
        (x,) = model.example_inputs(3)
        _, want = oracle(ref, (x,), 1)
        for p, (n, g) in zip(ref.parameters(), ((n, g) for n, g in want.items() if n != "input.0")):
            p.grad = g.clone()
        opt.zero_grad()
        cm(x).backward()
        got = {n: p.grad for n, p in model.named_parameters()}
        want.pop("input.0")
        assert max_rel_err(got, want) < 1e-10, (step, worst_param(got, want))
        opt.step()
        opt_ref.step()
    assert len(backend.reports) == 1


def test_batchnorm_outside_the_stream():
    """The captured functional batch norm goes back to the native op outside the stream."""
    torch.manual_seed(8)
    model = BNOutside().double()
    x = torch.randn(6, 8, dtype=torch.double)
    _, want = exact(model, (x,))
    m = copy.deepcopy(model)
    backend = hbp_backend(iters=3, codegen="eager", strict=True)
    torch.compile(m, backend=backend)(x.clone()).backward()
    got = {n: p.grad for n, p in m.named_parameters()}
    want.pop("input.0")
    assert [s.length for s in backend.reports[0].streams] == [3]
    assert max_rel_err(got, want) < 1e-10, worst_param(got, want)
    ref = copy.deepcopy(model)
    ref(x)
    for (name, b), b_ref in zip(m.named_buffers(), ref.buffers()):
        assert torch.equal(b, b_ref), name



def test_dynamic_shapes_keep_the_recomputing_backward_and_say_so():
    """Symbolic sizes: the template is not split (the batched split's batching rules would
    specialise the batch size); the backward re-linearises, and the report says why."""
    torch.manual_seed(1)
    model = GPT(n_layer=2).double()
    backend = hbp_backend(iters=1, codegen="eager", batched=True)
    cm = torch.compile(copy.deepcopy(model), backend=backend, dynamic=True)
    cm(*model.example_inputs(3)).backward()
    for g in backend.reports[0].streams[0].groups:
        assert g.saved == -1 and "symbolic sizes" in g.recompute_reason, str(backend.reports[0])
