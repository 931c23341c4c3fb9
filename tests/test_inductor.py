"""The same checks through Inductor (codegen="inductor"): slow on CPU, so a small subset."""
import pytest
import torch
from torch._dynamo.utils import counters

from helpers import compiled, exact, max_rel_err, oracle, worst_param
from models import GPT, ResMLP

pytestmark = pytest.mark.inductor


def test_inductor_exact_at_L_resmlp():
    torch.manual_seed(11)
    model = ResMLP(n_blocks=4).double()
    inputs = model.example_inputs(3)
    loss_ref, want = exact(model, inputs)
    loss, got, backend = compiled(model, inputs, 4, codegen="inductor")
    assert max_rel_err(got, want) < 1e-10, worst_param(got, want)
    assert torch.allclose(loss, loss_ref, rtol=1e-12, atol=0)
    assert backend.reports[0].streams[0].vjps_per_round == {str(r): 1 for r in range(1, 5)} | {"final": 1}


def test_inductor_matches_oracle_gpt():
    """A pre-LN GPT with two groups (attention, MLP), k = 1 < L = 4, float64."""
    torch.manual_seed(12)
    model = GPT(n_layer=2).double()
    inputs = model.example_inputs(2)
    _, want = oracle(model, inputs, 1)
    _, got, backend = compiled(model, inputs, 1, codegen="inductor")
    assert max_rel_err(got, want) < 1e-10, worst_param(got, want)
    (stream,) = backend.reports[0].streams
    assert [g.batched for g in stream.groups] == [True, True]


def test_inductor_caches_are_keyed_by_the_rewrite():
    """With Inductor's caches on, iters=1 then iters=2 must not reuse the iters=1 backward."""
    torch.manual_seed(13)
    model = ResMLP(n_blocks=3).double()
    inputs = model.example_inputs(2)
    with torch._inductor.config.patch(fx_graph_cache=True):
        for k in (1, 2, 1):
            torch._dynamo.reset()
            counters.clear()
            _, want = oracle(model, inputs, k)
            _, got, _ = compiled(model, inputs, k, codegen="inductor")
            assert max_rel_err(got, want) < 1e-10, (k, worst_param(got, want))
    # the last compile (iters=1 again) is served from the cache, and still right
    assert counters["inductor"]["fxgraph_cache_hit"] == 2
