"""Capture functions: per-block values computed outside the blocks (a GRU step's W_ih x_t + b_ih,
an adaLN gate W_l c + b_l) are differentiated in the final VJP, vmapped over the members, and
the backward graph of a cell loop no longer grows with the number of steps.

Oracles: eager autograd (k >= L) and tests/oracle_general.py (k < L), neither of which knows
about captures: they differentiate the model's own forward.
"""
import collections

import pytest
import torch

from helpers import (assert_exact, assert_matches_general_oracle, compiled, exact, max_rel_err,
                     oracle_general, worst_param)
from models_general import (ConditionedGateMLP, GRUCellLoop, GRULoop, LSTMLoop,
                            lstm_stream_from_step_1)

# name -> (factory, stream length, the oracle's view)
MODELS = {
    "gru_cell_loop": (lambda: GRUCellLoop(input_size=3, hidden=8, T=7), 7, {}),
    # reads x[:, t] backwards and skips two steps: x's gradient from the slices is scattered
    "gru_cell_loop_reversed": (lambda: GRUCellLoop(input_size=3, hidden=8, T=7,
                                                   order=[6, 4, 3, 2, 0]), 5, {}),
    "gru_loop": (lambda: GRULoop(input_size=3, hidden=8, T=6), 6, {}),
    # step 1 reads h0, not c0: the widened (c, h) stream starts at step 2 (test_residual_kinds)
    "lstm_loop": (lambda: LSTMLoop(input_size=3, hidden=8, T=7), 6,
                  {"view_fn": lstm_stream_from_step_1}),
    "adaln_gate": (lambda: ConditionedGateMLP(n_blocks=5), 5, {}),
}


def build(name):
    factory, L, view = MODELS[name]
    model = factory().double()
    return model, model.example_inputs(3), L, view


def capture_ops(backend):
    """Ops of each group's capture function, as the report gives them."""
    return [g.capture_ops for r in backend.reports for s in r.streams for g in s.groups]


@pytest.mark.parametrize("name", MODELS)
def test_capture_function_found_and_exact_at_L(name):
    torch.manual_seed(31)
    model, inputs, L, _ = build(name)
    before = torch._dynamo.utils.counters["hbp_compile"]["capture_fns_batched"]
    backend = assert_exact(model, inputs, L)
    assert all(n > 0 for n in capture_ops(backend)), str(backend.reports[0])
    assert torch._dynamo.utils.counters["hbp_compile"]["capture_fns_batched"] > before
    assert "differentiated batched" in str(backend.reports[0])


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("k", [0, 1, 2])
def test_capture_function_matches_oracle(name, k):
    torch.manual_seed(40 + k)
    model, inputs, _, view = build(name)
    backend = assert_matches_general_oracle(model, inputs, k, **view)
    assert all(n > 0 for n in capture_ops(backend))


def test_inductor_float32_gru_cell_loop():
    torch.manual_seed(50)
    model = GRUCellLoop(input_size=3, hidden=8, T=9)
    inputs = model.example_inputs(4)
    _, want = oracle_general(model.double(), [t.double() for t in inputs], 1)
    _, got, backend = compiled(model.float(), inputs, 1, codegen="inductor")
    assert all(n > 0 for n in capture_ops(backend))
    got = {n: g.double() for n, g in got.items()}
    assert max_rel_err(got, want) < 1e-5, worst_param(got, want)


def test_members_computing_captures_differently_keep_them_per_member():
    """Gates through sigmoid in some blocks and tanh in others: the blocks still form one group
    (the gate is their input), but there is no common capture function; gradients stay right."""
    torch.manual_seed(60)
    model = ConditionedGateMLP(n_blocks=4, acts=["sigmoid", "tanh", "sigmoid", "tanh"]).double()
    inputs = model.example_inputs(3)
    _, want = exact(model, inputs)
    _, got, backend = compiled(model, inputs, 4)
    (stream,) = backend.reports[0].streams
    assert len(stream.groups) == 1 and stream.groups[0].batched
    assert capture_ops(backend) == [0]
    assert max_rel_err(got, want) < 1e-10, worst_param(got, want)
    _, want = oracle_general(model, inputs, 1)
    _, got, _ = compiled(model, inputs, 1)
    assert max_rel_err(got, want) < 1e-10, worst_param(got, want)


def backward_ops(T, k=2):
    """Op counts of the compiled backward of a GRUCell loop over T steps."""
    torch.manual_seed(70)
    model = GRUCellLoop(input_size=3, hidden=8, T=T).double()
    torch._dynamo.reset()
    _, _, backend = compiled(model, model.example_inputs(2), k)
    (report,) = backend.reports
    assert report.streams[0].length == T
    bw = report.graphs["backward"]
    return collections.Counter(str(n.target) for n in bw.graph.nodes if n.op == "call_function")


def test_loop_backward_graph_does_not_grow_with_T():
    """One batched VJP per round, one capture VJP, and the scans as one op each: the backward
    of 40 and of 80 steps holds the same ops (only the saved per-step inputs grow)."""
    short, long = backward_ops(40), backward_ops(80)
    assert short == long, set(short.items()) ^ set(long.items())
    assert long["hbp.reverse_linear_scan.default"] == 3          # rounds 0, 1, 2
    assert sum(v for op, v in long.items() if op in ("aten.mm.default", "aten.bmm.default")) < 12
