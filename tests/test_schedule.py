"""ScheduledIters: one compile per distinct k over the same module, exact at k >= L, the k of
every step recorded; float64, eager codegen, a residual MLP of L = 6 blocks."""
import copy

import pytest
import torch

from helpers import clone_inputs, exact, grads_of, max_rel_err, oracle
from hbp_compile import ScheduledIters, calibrated, stepwise
from models import ResMLP

L = 6


def _model(seed=0):
    torch.manual_seed(seed)
    return ResMLP(d=8, hidden=16, n_blocks=L).double()


def _step(scheduled, model, inputs):
    """One forward + backward through the schedule; the parameter (and input) gradients."""
    model.zero_grad(set_to_none=True)
    xs = clone_inputs(inputs)
    scheduled(*xs).backward()
    return grads_of(model, xs)


def test_each_k_compiles_once_and_is_reused():
    model = _model()
    inputs = model.example_inputs()
    ks = [0, 0, 2, 2, 0, 2, 0]
    scheduled = ScheduledIters(model, lambda step: ks[step], codegen="eager")
    for _ in ks:
        _step(scheduled, model, inputs)
    # one graph per k, whatever the number of steps or switches back to it
    assert scheduled.compiles() == {0: 1, 2: 1}
    for k in (0, 2):
        (report,) = scheduled.backends[k].reports
        assert [s.length for s in report.streams] == [L]      # the rewrite happened
        assert report.rewritten_blocks == L


def test_k_at_least_L_is_exact_and_k_below_is_highway_bp():
    model = _model()
    inputs = model.example_inputs()
    scheduled = ScheduledIters(model, stepwise([(0, L), (1, 1)]), codegen="eager")
    _, want = exact(model, inputs)
    assert max_rel_err(_step(scheduled, model, inputs), want) < 1e-10       # step 0: k = L
    got = _step(scheduled, model, inputs)                                   # step 1: k = 1
    _, want_k1 = oracle(model, inputs, 1)
    assert max_rel_err(got, want_k1) < 1e-10
    assert max_rel_err(got, want) > 1e-3                # k = 1 < L is an approximation


def test_parameters_are_shared_between_the_wrappers():
    model = _model()
    reference = copy.deepcopy(model)
    inputs = model.example_inputs()
    scheduled = ScheduledIters(model, lambda step: [L, L + 1, L][step], codegen="eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for _ in range(3):                  # k >= L every step: exact, so eager SGD is the reference
        _step(scheduled, model, inputs)
        opt.step()
        ref_opt.zero_grad()
        reference(*clone_inputs(inputs)).backward()
        ref_opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert max_rel_err({"p": p.detach()}, {"p": q.detach()}) < 1e-10


def test_the_k_of_every_step_is_recorded():
    model = _model()
    inputs = model.example_inputs()
    schedule = stepwise([(0, 0), (3, 1), (5, 2)])
    scheduled = ScheduledIters(model, schedule, codegen="eager")
    for _ in range(7):
        _step(scheduled, model, inputs)
    assert scheduled.ks == [0, 0, 0, 1, 1, 2, 2]
    assert [(u.k, u.first, u.last) for u in scheduled.uses()] == [(0, 0, 2), (1, 3, 4), (2, 5, 6)]
    assert "steps 3-4: k=1" in scheduled.summary()


def test_calibrated_schedule_calibrates_every_n_steps():
    model = _model()
    inputs = model.example_inputs()
    calls = []

    def batch():
        calls.append(len(calls))
        return clone_inputs(inputs, grad_inputs=False)

    # a cosine no k < L reaches: the pick is the largest candidate, L (exact)
    schedule = calibrated(model, batch, every=3, target_cosine=1.0 - 1e-9, candidates=(0, L))
    scheduled = ScheduledIters(model, schedule, codegen="eager")
    for _ in range(7):
        _step(scheduled, model, inputs)
    assert len(calls) == 3                               # steps 0, 3, 6
    assert scheduled.ks == [L] * 7
    assert [step for step, _, _ in schedule.choices] == [0, 3, 6]
    assert all(cos >= 1.0 - 1e-9 for _, _, cos in schedule.choices)


def test_bad_schedules_raise():
    model = _model()
    inputs = model.example_inputs()
    with pytest.raises(ValueError, match="iters k must be an int"):
        _step(ScheduledIters(model, lambda step: -1, codegen="eager"), model, inputs)
    with pytest.raises(TypeError, match="uncompiled module"):
        ScheduledIters(torch.compile(model), 1)
    with pytest.raises(ValueError, match="start at step 0"):
        stepwise([(5, 1)])
    with pytest.raises(ValueError, match="every"):
        calibrated(model, lambda: inputs, every=0)
