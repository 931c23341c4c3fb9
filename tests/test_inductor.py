"""The same checks through Inductor (codegen="inductor"): slow on CPU, so a small subset."""
import pytest
import torch
from torch._dynamo.utils import counters

from helpers import (assert_matches, compiled, exact, lstm_oracle, max_rel_err, oracle,
                     worst_param)
from models import GPT, ResMLP
from models_general import LSTMLoop

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


INDUCTOR_VS_ORACLE = {
    # a pre-LN GPT with two groups (attention, MLP), k = 1 < L = 4, float64
    "gpt": (12, lambda: GPT(n_layer=2), oracle),
    # the (c, h) state and its 2 x 2 matrix scan
    "lstm_widened_state": (14, lambda: LSTMLoop(T=6), lstm_oracle),
}


@pytest.mark.parametrize("name", INDUCTOR_VS_ORACLE)
def test_inductor_matches_oracle(name):
    seed, factory, reference = INDUCTOR_VS_ORACLE[name]
    torch.manual_seed(seed)
    model = factory().double()
    inputs = model.example_inputs(2)
    _, _, backend = assert_matches(reference(model, inputs, 1)[1], model, inputs, 1,
                                   codegen="inductor")
    (stream,) = backend.reports[0].streams
    if name == "gpt":
        assert [g.batched for g in stream.groups] == [True, True]
    else:
        assert "widened" in stream.residual_kind


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


def test_inductor_post_ln_with_dropout_exact_at_L():
    """Post-LN steps with dropout masks drawn in the forward and saved: with Inductor's
    fallback_random the masks are eager's, so k = L equals eager autograd."""
    import torch.nn as nn

    class Layer(nn.Module):
        def __init__(self, d=8):
            super().__init__()
            self.f, self.ln = nn.Linear(d, d), nn.LayerNorm(d)

        def forward(self, x):
            return self.ln(x + nn.functional.dropout(torch.tanh(self.f(x)), 0.2, self.training))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(*[Layer() for _ in range(3)])

        def forward(self, x):
            return self.layers(x).pow(2).mean()

    torch.manual_seed(15)
    model = Model().double()
    inputs = (torch.randn(4, 8, dtype=torch.double),)
    with torch._inductor.config.patch(fallback_random=True):
        torch.manual_seed(16)
        _, want = exact(model, inputs)
        torch.manual_seed(16)
        _, got, backend = compiled(model, inputs, 3, codegen="inductor")
    (stream,) = backend.reports[0].streams
    assert stream.residual_kind == "post-LN" and "random draw" in stream.groups[0].summary
    assert max_rel_err(got, want) < 1e-10, worst_param(got, want)
