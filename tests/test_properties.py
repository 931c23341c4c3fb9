"""Property tests (hypothesis) over random residual architectures (tests/models_random.py):
depth, residual kinds, bodies, tied and frozen weights, taps on intermediate states, side
inputs, an integer buffer, views and projections between steps, side branches. At k >= L the gradients equal eager autograd; at k in {0, 1, 2}
they equal the eager oracle (tests/oracle_general.py); the report accounts for every step.

The default run draws a few architectures of depth <= 6; `make test-all` (--runslow) draws
many, of depth up to 16. A failure hypothesis shrinks becomes a regular test below.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import compiled, exact, max_rel_err, oracle_general, worst_param
from models_random import AFTERS, BODIES, KINDS, RandomResidualNet, StepSpec

FLOOR = 1e-7        # gradients below this fraction of the largest are compared at that scale


@st.composite
def architectures(draw, max_depth):
    depth = draw(st.integers(1, max_depth))
    specs = []
    for l in range(depth):
        share = draw(st.one_of(st.none(), st.integers(0, l - 1))) if l else None
        specs.append(StepSpec(kind=draw(st.sampled_from(KINDS)), body=draw(st.sampled_from(BODIES)),
                              share=share, frozen=draw(st.booleans()), tap=draw(st.booleans()),
                              side=draw(st.booleans()),
                              after=draw(st.sampled_from(AFTERS)) if l < depth - 1 else None))
    return specs


def check(specs, seed, ks=(0, 1, 2)):
    """Exact at k = L, the oracle at ks, and a report that accounts for every step."""
    torch._dynamo.reset()            # one test, many examples: stay below the recompile limit
    torch.manual_seed(seed)
    model = RandomResidualNet(specs).double()
    inputs = model.example_inputs()
    L = len(specs)
    _, want = exact(model, inputs)
    _, got, backend = compiled(model, inputs, L)
    (report,) = backend.reports
    rewritten = sum(s.length for s in report.streams)
    assert rewritten + len(report.skipped) >= L or (L == 1 and not report.streams), str(report)
    assert max_rel_err(got, want, FLOOR) < 1e-9, (worst_param(got, want), str(report))
    whole = [s.length for s in report.streams] == [L] and model.plain()
    for k in ks:
        if k >= L or not whole:
            continue                     # a cut stream runs part exact: autograd above says it
        torch._dynamo.reset()
        _, want_k = oracle_general(model, inputs, k)
        _, got_k, _ = compiled(model, inputs, k)
        assert max_rel_err(got_k, want_k, FLOOR) < 1e-9, (k, worst_param(got_k, want_k))


SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck),
                print_blob=True)


@settings(max_examples=4, **SETTINGS)
@given(specs=architectures(max_depth=6), seed=st.integers(0, 2 ** 16))
def test_random_architectures(specs, seed):
    check(specs, seed, ks=(1,))


def test_lone_post_ln_after_an_identity_step_is_the_heads_norm():
    """Shrunk by hypothesis: LN(x_1 + z_1) after an x + z step is no post-LN chain (no norm
    next to it): the pass reads it as an identity step and the head's final norm."""
    check([StepSpec("identity", "mlp"), StepSpec("postln", "mlp")], seed=0)


@pytest.mark.slow
@settings(max_examples=120, **SETTINGS)
@given(specs=architectures(max_depth=16), seed=st.integers(0, 2 ** 16))
def test_random_architectures_long(specs, seed):
    check(specs, seed)
