"""nn.RNN / nn.GRU / nn.LSTM under hbp: one stream over time per layer and direction, without
unrolling. Oracles: eager autograd of the module (k >= T, same seed, so the same dropout masks)
and tests/oracle_rnn.py, an eager Highway-BP over the module's weights (k in {0, 1, 2})."""
import copy

import pytest
import torch
import torch.nn as nn

from hbp_compile import hbp_backend
from helpers import max_rel_err, worst_param
from models_rnn import RNNWithLoss, loss_of
from oracle_rnn import module_highway

# (module, num_layers, bidirectional, batch_first, h0 given, dropout, loss at every step)
CONFIGS = {
    "gru": ("GRU", 1, False, False, False, 0.0, True),
    "gru-last-h0": ("GRU", 1, False, True, True, 0.0, False),
    "gru-2-bidir-dropout": ("GRU", 2, True, True, False, 0.3, True),
    "lstm": ("LSTM", 1, False, False, True, 0.0, True),
    "lstm-2-bidir": ("LSTM", 2, True, False, True, 0.0, False),
    "lstm-3-dropout": ("LSTM", 3, False, True, False, 0.25, True),
    "rnn-tanh-bidir": ("RNN", 1, True, False, True, 0.0, True),
    "rnn-relu-2": ("RNN", 2, False, True, False, 0.0, True),
}


def make(name, dtype=torch.float64, T=6, B=2, seed=0):
    kind, layers, bidir, bf, h0, p, every = CONFIGS[name]
    torch.manual_seed(seed)
    nonlin = "relu" if "relu" in name else "tanh"
    model = RNNWithLoss(kind, layers, bidir, bf, p, every, nonlinearity=nonlin).to(dtype)
    x = torch.randn((B, T, 3) if bf else (T, B, 3), dtype=dtype)
    n = layers * (2 if bidir else 1)
    hx = None
    if h0:
        hx = torch.randn(n, B, 5, dtype=dtype)
        if kind == "LSTM":
            hx = (hx, torch.randn(n, B, 5, dtype=dtype))
    return model, x, hx


def _leaves(x, hx):
    x = x.detach().clone().requires_grad_()
    if hx is None:
        return x, None
    if isinstance(hx, tuple):
        return x, tuple(h.detach().clone().requires_grad_() for h in hx)
    return x, hx.detach().clone().requires_grad_()


def _grads(model, x, hx):
    g = {n: p.grad.clone() for n, p in model.named_parameters()}
    g["x"] = x.grad.clone()
    for i, h in enumerate(hx if isinstance(hx, tuple) else () if hx is None else (hx,)):
        g[f"h{i}"] = h.grad.clone()
    return g


def run_compiled(model, x, hx, k, seed=1, **options):
    m = copy.deepcopy(model)
    backend = hbp_backend(iters=k, **{"codegen": "eager", **options})
    cm = torch.compile(m, backend=backend)
    x, hx = _leaves(x, hx)
    torch.manual_seed(seed)
    loss = cm(x, hx)
    loss.backward()
    return loss.detach(), _grads(m, x, hx), backend


def run_eager(model, x, hx, seed=1):
    m = copy.deepcopy(model)
    x, hx = _leaves(x, hx)
    torch.manual_seed(seed)
    loss = m(x, hx)
    loss.backward()
    return loss.detach(), _grads(m, x, hx)


def run_oracle(model, x, hx, k, seed=1):
    m = copy.deepcopy(model)
    x, hx = _leaves(x, hx)
    loss = module_highway(m.rnn, x, hx, lambda o, h: loss_of(o, h, m.every_step), k, seed)
    return loss, _grads(m, x, hx)


def assert_streams(backend, model, T):
    (report,) = backend.reports
    rnn = model.rnn
    n = rnn.num_layers * (2 if rnn.bidirectional else 1)
    assert report.rnn_calls == 1
    assert [s.length for s in report.streams] == [T] * n, str(report)
    assert all(s.vjps_per_round for s in report.streams), str(report)
    assert not report.fallback_reason


@pytest.mark.parametrize("name", list(CONFIGS))
def test_exact_at_T_and_same_forward(name):
    """k = T: the gradients of eager autograd; the forward (dropout included) bit for bit."""
    T = 6
    model, x, hx = make(name, T=T)
    loss_want, want = run_eager(model, x, hx)
    loss, got, backend = run_compiled(model, x, hx, T)
    assert_streams(backend, model, T)
    assert loss.item() == loss_want.item() or model.rnn.bidirectional, (loss, loss_want)
    torch.testing.assert_close(loss, loss_want, rtol=1e-14, atol=0)
    assert max_rel_err(got, want) < 1e-10


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("k", [0, 1, 2])
def test_matches_the_oracle(name, k):
    T = 7
    model, x, hx = make(name, T=T, seed=k + 3)
    loss_want, want = run_oracle(model, x, hx, k)
    loss, got, backend = run_compiled(model, x, hx, k)
    assert_streams(backend, model, T)
    torch.testing.assert_close(loss, loss_want, rtol=1e-12, atol=0)
    assert max_rel_err(got, want) < 1e-10
    _, exact = run_eager(model, x, hx)
    assert max_rel_err(got, exact) > 1e-6              # Highway-BP at k < T is not backprop


def test_oracle_is_exact_at_T():
    """The oracle's own check, on the hardest configuration: k = T is eager autograd."""
    model, x, hx = make("lstm-3-dropout", T=5)
    _, want = run_eager(model, x, hx)
    _, got = run_oracle(model, x, hx, 5)
    assert max_rel_err(got, want) < 1e-10


@pytest.mark.parametrize("scan,T", [("chunked", 40), ("log-depth", 13), ("auto", 150)])
@pytest.mark.parametrize("name", ["gru", "lstm"])
def test_scan_forms_and_long_sequences(name, scan, T):
    """Every scan form over time (auto picks the opaque op past 32 steps on a CPU)."""
    model, x, hx = make(name, T=T, seed=T)
    _, want = run_oracle(model, x, hx, 1)
    _, got, backend = run_compiled(model, x, hx, 1, scan=scan)
    assert_streams(backend, model, T)
    assert ("op" if scan == "auto" else scan) in backend.reports[0].streams[0].scan
    assert max_rel_err(got, want) < 1e-10


@pytest.mark.parametrize("name", ["gru", "lstm-2-bidir"])
def test_gamma_split(name):
    """The paper's gamma split over time: K -> (1 - gamma) K, gamma K^T g into each VJP."""
    from oracle_general import highway_backward_general
    import oracle_rnn

    model, x, hx = make(name, T=6, seed=11)
    real = oracle_rnn.highway_backward_general
    oracle_rnn.highway_backward_general = \
        lambda s, h, k: highway_backward_general(s, h, k, gamma=0.3)
    try:
        _, want = run_oracle(model, x, hx, 1)
    finally:
        oracle_rnn.highway_backward_general = real
    _, got, _ = run_compiled(model, x, hx, 1, gamma=0.3)
    assert max_rel_err(got, want) < 1e-10


FLOAT32 = [(name, "eager") for name in CONFIGS] + \
    [(name, "inductor") for name in ("gru-2-bidir-dropout", "lstm-2-bidir", "rnn-relu-2")]


@pytest.mark.parametrize("name,codegen", FLOAT32)
def test_float32(name, codegen):
    """float32, on a CPU the kernels an exact float32 run uses (an LSTM's is mkldnn's): within
    1e-5 of the float64 oracle at k = 2 and of float64 autograd at k = T."""
    T = 6
    model, x, hx = make(name, T=T, seed=7)
    f32, x32, hx32 = as_float32(model, x, hx)
    for k, (_, want) in [(2, run_oracle(model, x, hx, 2)), (T, run_eager(model, x, hx))]:
        _, got, backend = run_compiled(f32, x32, hx32, k, codegen=codegen)
        assert_streams(backend, model, T)
        assert max_rel_err({n: g.double() for n, g in got.items()}, want) < 1e-5


def as_float32(model, x, hx):
    """A float32 copy of a float64 model and its inputs."""
    hx32 = None if hx is None else tuple(h.float() for h in hx) if isinstance(hx, tuple) \
        else hx.float()
    return copy.deepcopy(model).float(), x.float(), hx32


def test_unsupported_layers_stay_exact_with_a_reason():
    """An LSTM with proj_size: lowered (no unrolling) but exact backprop, and the report says."""
    torch.manual_seed(0)
    model = RNNWithLoss("LSTM", 2, False, False, 0.0, True)
    model.rnn = nn.LSTM(3, 5, num_layers=2, proj_size=2).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    _, want = run_eager(model, x, None)
    _, got, backend = run_compiled(model, x, None, 0)
    (report,) = backend.reports
    assert not report.streams and report.rnn_calls == 1
    assert any("proj_size" in s.reason for s in report.skipped), str(report)
    assert max_rel_err(got, want) < 1e-12


def test_rnn_modules_off_is_exact():
    """rnn_modules=False: Dynamo runs the module as without hbp (a graph break), exact grads."""
    model, x, hx = make("gru", T=5)
    _, want = run_eager(model, x, hx)
    _, got, backend = run_compiled(model, x, hx, 0, rnn_modules=False)
    assert not any(r.streams for r in backend.reports)
    assert max_rel_err(got, want) < 1e-12


def test_other_backends_do_not_see_allow_rnn():
    """Only hbp frames trace RNN modules: an exact compile in the same process of a float32
    LSTM (which allow_rnn=True would hand AOTAutograd as mkldnn_rnn_layer, and crash) runs as
    by default, and Dynamo's own config still reads as not set."""
    hbp_backend(iters=1)                     # installs the hook
    seen = []

    def counting(gm, example_inputs):
        seen.append(gm)
        from torch._dynamo.backends.common import aot_autograd
        from functorch.compile import make_boxed_func
        return aot_autograd(fw_compiler=lambda g, _: make_boxed_func(g.forward))(
            gm, example_inputs)

    lstm = nn.LSTM(3, 4, num_layers=2)
    x = torch.randn(5, 2, 3, dtype=torch.float32)
    want = torch.autograd.grad(lstm(x)[0].sum(), list(lstm.parameters()))
    out = torch.compile(lstm, backend=counting)(x)[0]
    got = torch.autograd.grad(out.sum(), list(lstm.parameters()))
    assert not any(n.target is torch.lstm for g in seen for n in g.graph.nodes)
    assert not torch._dynamo.config.allow_rnn
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_another_backend_on_the_same_code_is_not_silent():
    """Dynamo skips a frame for every backend once one backend cannot trace its RNN module:
    the pass cannot prevent that, so it says so when it happens."""
    class Fresh(nn.Module):                   # a code object no other test compiled
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(3, 4)

        def forward(self, x):
            return self.rnn(x)[0].sum()

    hbp_backend(iters=1)
    x = torch.randn(5, 2, 3)
    with pytest.warns(UserWarning, match="Dynamo skips that frame"):
        torch.compile(Fresh(), backend="aot_eager")(x)


def test_string_backend_traces_rnn_modules():
    """backend="hbp" (the entry point) rewrites nn.GRU as hbp_backend(...) does."""
    from hbp_compile import string_backend

    T = 5
    model, x, hx = make("gru", T=T, seed=21)
    _, want = run_oracle(model, x, hx, 1)
    m = copy.deepcopy(model)
    cm = torch.compile(m, backend="hbp", options={"iters": 1, "codegen": "eager"})
    x, hx = _leaves(x, hx)
    torch.manual_seed(1)
    cm(x, hx).backward()
    assert max_rel_err(_grads(m, x, hx), want) < 1e-10
    report = string_backend(iters=1, codegen="eager").reports[-1]
    assert [s.length for s in report.streams] == [T]


@pytest.mark.parametrize("name", ["gru-2-bidir-dropout", "lstm-2-bidir"])
def test_sequence_length_changes_one_symbolic_graph(name):
    """Called at T = 5, 8, 11 (automatic dynamic: the second call compiles a graph with a
    symbolic T, the third reuses it): every call is Highway-BP, equal to the oracle at k = 1,
    and the report says the length is symbolic."""
    model, _, _ = make(name, T=5)
    backend = hbp_backend(iters=1, codegen="eager")
    cm = torch.compile(copy.deepcopy(model), backend=backend)
    for T in (5, 8, 11):
        _, x, hx = make(name, T=T, seed=T)
        _, want = run_oracle(model, x, hx, 1)
        cm.zero_grad()
        xl, hl = _leaves(x, hx)
        torch.manual_seed(1)
        cm(xl, hl).backward()
        got = _grads(cm._orig_mod, xl, hl)
        assert max_rel_err(got, want) < 1e-10, (T, worst_param(got, want))
    assert len(backend.reports) == 2, [str(r) for r in backend.reports]
    assert all(s.length for s in backend.reports[1].streams)
    assert "symbolic" in str(backend.reports[1])


@pytest.mark.parametrize("name", ["gru", "lstm-2-bidir", "rnn-tanh-bidir", "gru-2-bidir-dropout"])
@pytest.mark.parametrize("chunks", [4, "auto"])
def test_cell_vjp_in_runs_of_time_steps(name, chunks, monkeypatch):
    """rnn_time_chunks: the backward runs the cell's recompute and VJPs in runs of time steps
    (4 runs of 3, 3, 3 and 2 steps here; "auto" made to pick the same by asking 4 short runs):
    the report says so, and the gradients are still the oracle's at k = 1, 2 and exact at
    k = T."""
    import hbp_compile.rewrite.highway_rnn as highway_rnn

    T, B = 11, 3
    monkeypatch.setattr(highway_rnn, "CPU_RUNS", 4)
    monkeypatch.setattr(highway_rnn, "MIN_RUN_STEPS", 2)
    monkeypatch.setattr(highway_rnn, "MAX_ITERS_IN_RUNS", T)      # k = T in runs too

    model, x, hx = make(name, T=T, B=B, seed=5)
    for k in (1, 2):
        _, want = run_oracle(model, x, hx, k)
        _, got, backend = run_compiled(model, x, hx, k, rnn_time_chunks=chunks)
        assert_streams(backend, model, T)
        assert in_runs(backend, 4), str(backend.reports[0])
        assert max_rel_err(got, want) < 1e-10, worst_param(got, want)
    _, want = run_eager(model, x, hx)
    _, got, backend = run_compiled(model, x, hx, T, rnn_time_chunks=chunks)
    assert in_runs(backend, 4), str(backend.reports[0])
    assert max_rel_err(got, want) < 1e-10, worst_param(got, want)


def in_runs(backend, n: int) -> bool:
    """Every RNN stream's report says its backward runs in n runs of time steps."""
    return all(f"in {n} runs of time steps" in s.groups[0].summary
               for s in backend.reports[0].streams)


@pytest.mark.parametrize("name,dtype", [("gru", torch.float64), ("lstm-2-bidir", torch.float64),
                                        ("gru-2-bidir-dropout", torch.float32)])
def test_default_runs_of_time_steps_under_inductor(name, dtype):
    """The defaults on a CPU at T = 64: 8 runs of 8 time steps per layer and direction, compiled
    by Inductor, equal the independent float64 oracle at k = 1 (float32: within 1e-5)."""
    T = 64
    model, x, hx = make(name, T=T, B=2, seed=13)
    _, want = run_oracle(model, x, hx, 1)
    run = (model, x, hx) if dtype == torch.float64 else as_float32(model, x, hx)
    _, got, backend = run_compiled(*run, 1, codegen="inductor")
    assert_streams(backend, model, T)
    assert in_runs(backend, 8), str(backend.reports[0])
    got = {n: g.double() for n, g in got.items()}
    assert max_rel_err(got, want) < (1e-10 if dtype == torch.float64 else 1e-5), \
        worst_param(got, want)


def test_auto_runs_only_at_small_k():
    """Past k = 10 "auto" keeps one run (the runs would be copied into every round); the
    gradients are the oracle's either way."""
    T = 64
    model, x, hx = make("gru", T=T, B=2, seed=17)
    for k, summary in ((10, "in 8 runs of time steps"), (11, "one VJP over T x B rows per round")):
        _, want = run_oracle(model, x, hx, k)
        _, got, backend = run_compiled(model, x, hx, k)
        assert summary in backend.reports[0].streams[0].groups[0].summary, str(backend.reports[0])
        assert max_rel_err(got, want) < 1e-10, worst_param(got, want)
