"""Hostile setups: what a torch.compile user does around the model. Each one works and is right
(exact autograd or an aot_eager compile at k >= L, the oracle below) or says in the report what
was left exact and why; none crashes or gives a wrong gradient silently.

Test models are tests/models.py's; the references share no code with the package.
"""
import copy

import pytest
import torch

from helpers import max_rel_err, oracle, worst_param
from hbp_compile import hbp_backend
from models import (GPT, CheckpointedMLP, InPlaceMLP, InPlaceStreamMLP, LearnedMaskAttention,
                    ResMLP)

L = 4


def grads_of(model):
    return {n.replace("_orig_mod.", ""): p.grad.clone() for n, p in model.named_parameters()
            if p.grad is not None}


def run(model, backend, step, seed=0):
    """step(compiled copy) under a seed; (gradients, the copy)."""
    torch._dynamo.reset()
    m = copy.deepcopy(model)
    torch.manual_seed(seed)
    step(torch.compile(m, backend=backend))
    return grads_of(m), m


def check_exact(model, step, k=L, rewritten=L, **options):
    """hbp at k >= L gives aot_eager's gradients, and the pass rewrote `rewritten` blocks."""
    want, _ = run(model, "aot_eager", step)
    backend = hbp_backend(iters=k, codegen="eager", **options)
    got, _ = run(model, backend, step)
    assert sum(s.length for r in backend.reports for s in r.streams) == rewritten, \
        str(backend.reports[-1]) if backend.reports else "no graph"
    assert max_rel_err(got, want) < 1e-10, worst_param(got, want)
    return backend


def mlp(n_blocks=L):
    torch.manual_seed(0)
    return ResMLP(n_blocks=n_blocks).double()


def x64(batch=4, d=16, requires_grad=False):
    return torch.randn(batch, d, dtype=torch.float64, requires_grad=requires_grad)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_inside_blocks(reentrant):
    torch.manual_seed(0)
    model = CheckpointedMLP(reentrant, n_blocks=L).double()
    x = x64(requires_grad=True)
    check_exact(model, lambda m: m(x).backward())


def test_in_place_residual_add():
    torch.manual_seed(0)
    x = x64()
    check_exact(InPlaceMLP(n_blocks=L).double(), lambda m: m(x).backward())


def test_in_place_update_of_the_stream():
    """Eager autograd rejects `x += block(x)` at backward (the block saved x), aot_eager at
    compile; the pass differentiates the program it means, x_{l+1} = x_l + block(x_l): the
    gradients of the out-of-place model, at k >= L and at k < L."""
    torch.manual_seed(0)
    model, x = InPlaceStreamMLP(n_blocks=L).double(), x64()
    with pytest.raises(Exception, match="modified by an inplace operation"):
        run(model, "aot_eager", lambda m: m(x).backward())
    for k in (L, 1):
        backend = hbp_backend(iters=k, codegen="eager")
        got, _ = run(model, backend, lambda m: m(x).backward())
        assert [s.length for s in backend.reports[0].streams] == [L]
        _, want = oracle(model, (x,), k)           # the out-of-place stream_view
        want = {n: g for n, g in want.items() if not n.startswith("input")}
        assert max_rel_err(got, want) < 1e-10, worst_param(got, want)


def test_input_that_requires_grad_non_contiguous():
    x = torch.randn(16, 4, dtype=torch.float64).t().requires_grad_()     # (4, 16), strided
    model = mlp()
    ref = copy.deepcopy(model)
    xr = x.detach().clone().requires_grad_()
    ref(xr).backward()
    got, _ = run(model, hbp_backend(iters=L, codegen="eager"), lambda m: m(x).backward())
    assert max_rel_err(got, grads_of(ref)) < 1e-10
    assert max_rel_err({"x": x.grad}, {"x": xr.grad}) < 1e-10


def test_eval_mode():
    x = x64()
    check_exact(mlp().eval(), lambda m: m(x).backward())


def test_functional_call():
    x = x64()

    def step(cm):
        params = dict(cm.named_parameters())
        torch.func.functional_call(cm, params, (x,)).backward()
    check_exact(mlp(), step)


def test_64_block_module_list():
    torch.manual_seed(0)
    model = ResMLP(d=8, hidden=8, n_blocks=64).double()
    x = torch.randn(4, 8, dtype=torch.float64)
    check_exact(model, lambda m: m(x).backward(), k=64, rewritten=64)


def test_retain_graph_and_a_second_backward():
    """Two backwards of one forward accumulate twice the Highway-BP gradient (k < L too)."""
    x = x64()

    def step(cm):
        loss = cm(x)
        loss.backward(retain_graph=True)
        loss.backward()
    got, _ = run(mlp(), hbp_backend(iters=1, codegen="eager"), step)
    _, want = oracle(mlp(), (x,), 1)
    want = {n: 2 * g for n, g in want.items() if not n.startswith("input")}
    assert max_rel_err(got, want) < 1e-10, worst_param(got, want)


def test_double_backward_is_a_clear_error():
    """create_graph=True through a Highway-BP backward: a second derivative of an approximate
    gradient has no meaning; torch says so rather than returning numbers."""
    x = x64()
    cm = torch.compile(mlp(), backend=hbp_backend(iters=1, codegen="eager"))
    loss = cm(x)
    g = torch.autograd.grad(loss, list(cm.parameters()), create_graph=True)
    with pytest.raises(RuntimeError, match="double backward|does not require grad|twice"):
        torch.autograd.grad(sum(t.sum() for t in g), list(cm.parameters()))


def test_gradient_accumulation_over_micro_batches():
    """Three micro-batches, one backward each, gradients summed: the oracle's sum (k < L)."""
    torch.manual_seed(3)
    xs = [x64(batch=3) for _ in range(3)]
    got, _ = run(mlp(), hbp_backend(iters=1, codegen="eager"),
                 lambda cm: [cm(x).backward() for x in xs])
    want = {}
    for x in xs:
        for n, g in oracle(mlp(), (x,), 1)[1].items():
            if not n.startswith("input"):
                want[n] = want.get(n, 0) + g
    assert max_rel_err(got, want) < 1e-10, worst_param(got, want)


def test_determinism_same_seed_bitwise_equal_gradients():
    torch.manual_seed(4)
    model = GPT(n_layer=2).double()
    inputs = model.example_inputs(2)
    backend = hbp_backend(iters=1, codegen="eager")
    a, _ = run(model, backend, lambda cm: cm(*inputs).backward(), seed=9)
    b, _ = run(model, backend, lambda cm: cm(*inputs).backward(), seed=9)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_two_backends_with_different_options_in_one_process():
    """Two compiled copies with k = 0 and k = L live side by side: no cache mixes them."""
    x = x64()
    model = mlp()
    m0, mL = copy.deepcopy(model), copy.deepcopy(model)
    c0 = torch.compile(m0, backend=hbp_backend(iters=0, codegen="eager"))
    cL = torch.compile(mL, backend=hbp_backend(iters=L, codegen="eager"))
    for _ in range(2):                                   # interleaved, twice
        m0.zero_grad(), mL.zero_grad()
        c0(x).backward()
        cL(x).backward()
    _, want0 = oracle(model, (x,), 0)
    _, wantL = oracle(model, (x,), L)
    strip = lambda g: {n: t for n, t in g.items() if not n.startswith("input")}  # noqa: E731
    assert max_rel_err(grads_of(m0), strip(want0)) < 1e-10
    assert max_rel_err(grads_of(mL), strip(wantL)) < 1e-10


def test_compiled_optimizer_step():
    """The optimizer step compiled too (a graph without a stream): parameters after two steps
    equal an exact compile's at k >= L."""
    x = x64()

    def train(backend):
        torch._dynamo.reset()
        m = mlp()
        cm = torch.compile(m, backend=backend)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        step = torch.compile(opt.step, backend=backend)
        for _ in range(2):
            opt.zero_grad()
            cm(x).backward()
            step()
        return {n: p.detach().clone() for n, p in m.named_parameters()}

    want = train("aot_eager")
    got = train(hbp_backend(iters=L, codegen="eager"))
    assert max_rel_err(got, want) < 1e-10, worst_param(got, want)


def test_fp16_autocast_with_grad_scaler():
    """fp16 blocks on an fp32 stream, losses scaled by GradScaler: the same unscaled gradients
    as an exact compile at k >= L, to fp16 precision."""
    torch.manual_seed(7)
    model = ResMLP(n_blocks=L)
    x = model.example_inputs(4)[0]

    def step(cm):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = cm(x)
        scaler.scale(loss).backward()
        scaler.unscale_(torch.optim.SGD(cm.parameters(), lr=0.0))
    want, _ = run(model, "aot_eager", step)
    backend = hbp_backend(iters=L, codegen="eager", batched=False)
    got, _ = run(model, backend, step)
    assert [s.length for s in backend.reports[0].streams] == [L]
    assert max_rel_err(got, want) < 1e-12, worst_param(got, want)


def test_sequence_length_changes_with_mark_dynamic():
    """A GPT called at two sequence lengths with mark_dynamic on the length: one symbolic graph
    (no recompile), its backward recomputes the blocks and the report says why, gradients
    equal the oracle at both lengths."""
    torch.manual_seed(1)
    model = GPT(n_layer=2, block_size=12).double()
    backend = hbp_backend(iters=1, codegen="eager")
    cm = torch.compile(copy.deepcopy(model), backend=backend)
    for T in (6, 9):
        idx, targets = (t[:, :T].contiguous() for t in model.example_inputs(2))
        torch._dynamo.mark_dynamic(idx, 1)
        torch._dynamo.mark_dynamic(targets, 1)
        cm.zero_grad()
        cm(idx, targets).backward()
        got = grads_of(cm)
        _, want = oracle(model, (idx, targets), 1)
        assert max_rel_err(got, want) < 1e-10, worst_param(got, want)
    assert len(backend.reports) == 1
    assert "symbolic sizes" in backend.reports[0].streams[0].groups[0].recompute_reason


def test_attention_with_a_learned_mask_is_rewritten_and_exact():
    """The CPU flash kernel takes no gradient for its mask; the captured graph then runs SDPA's
    math form, and the mask parameter gets its gradient (Highway-BP at k = L is exact)."""
    from helpers import compiled, exact

    class Stream(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(LearnedMaskAttention() for _ in range(3))

        def forward(self, x):
            for b in self.blocks:
                x = x + b(x)
            return x.square().mean()

    torch.manual_seed(0)
    model = Stream().double()
    inputs = (torch.randn(2, 5, 8, dtype=torch.double),)
    _, want = exact(model, inputs)
    _, got, backend = compiled(model, inputs, 3)
    (report,) = backend.reports
    assert [s.length for s in report.streams] == [3] and report.coverage == 1.0, str(report)
    assert all(want[f"blocks.{i}.bias"].norm() > 0 for i in range(3))
    assert max_rel_err(got, want) < 1e-10, worst_param(got, want)
    _, approx, _ = compiled(model, inputs, 1)
    assert max_rel_err(approx, want) > 1e-6
