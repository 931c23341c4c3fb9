"""Batched rounds: one VJP per group of identical blocks per round, same gradients as unbatched."""
import pytest
import torch
from torch._dynamo.utils import counters

from helpers import compiled, exact, live_blocks, max_rel_err, oracle, seed_of, worst_param
from models import GPT, Alternating, ResMLP, SDPAStack, TiedSteps


MODELS = {
    "resmlp": lambda: ResMLP(n_blocks=6).double(),
    "gpt": lambda: GPT(n_layer=3).double(),
    "alternating": lambda: Alternating().double(),
    "tied": lambda: TiedSteps().double(),
    "sdpa": lambda: SDPAStack().double(),
}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("k", [1, 3])
def test_batched_equals_unbatched_equals_oracle(name, k):
    torch.manual_seed(len(name) * 10 + k)
    model = MODELS[name]()
    inputs = model.example_inputs(3)
    _, want = oracle(model, inputs, k)
    _, batched, b_backend = compiled(model, inputs, k, batched=True)
    torch._dynamo.reset()
    _, unbatched, u_backend = compiled(model, inputs, k, batched=False)
    assert max_rel_err(batched, want) < 1e-10, worst_param(batched, want)
    assert max_rel_err(unbatched, want) < 1e-10, worst_param(unbatched, want)
    (b_stream,), (u_stream,) = b_backend.reports[0].streams, u_backend.reports[0].streams
    assert all(g.batched for g in b_stream.groups)
    assert not any(g.batched for g in u_stream.groups)
    # from the backward graph: per round, one VJP per group batched, one per live block
    # unbatched, one per block in the final VJPs
    rounds = [str(r) for r in range(1, k + 1)] + ["final"]
    assert b_stream.vjps_per_round == {r: len(b_stream.groups) for r in rounds}
    L = u_stream.length
    assert u_stream.vjps_per_round == {str(r): len(live_blocks(L, k, r)) for r in range(1, k + 1)} \
        | {"final": L}



def test_groups_by_structure():
    torch.manual_seed(1)
    for name, members in [("alternating", [[0, 2, 4], [1, 3, 5]]), ("gpt", [[0, 2, 4], [1, 3, 5]]),
                          ("resmlp", [[0, 1, 2, 3, 4, 5]]), ("sdpa", [[0, 1, 2, 3]]),
                          ("tied", [[0, 1, 2, 3, 4]])]:
        torch._dynamo.reset()
        model = MODELS[name]()
        _, _, backend = compiled(model, model.example_inputs(2), 1)
        groups = backend.reports[0].streams[0].groups
        assert [g.members for g in groups] == members, name
    # the tied stream's block weights are captured once for all steps
    assert groups[0].shared_captures == 6        # LayerNorm w, b; fc1 w, b; fc2 w, b


def test_tied_weights_get_the_sum_over_steps_exact_at_L():
    torch.manual_seed(2)
    model = MODELS["tied"]()
    inputs = model.example_inputs(3)
    _, want = exact(model, inputs)
    _, got, _ = compiled(model, inputs, 5)
    assert max_rel_err(got, want) < 1e-10, worst_param(got, want)


def test_single_block_groups_run_unbatched_and_say_why():
    torch.manual_seed(3)
    model = Alternating(n_blocks=3).double()      # groups [0, 2] and [1]
    _, _, backend = compiled(model, model.example_inputs(2), 1)
    g0, g1 = backend.reports[0].streams[0].groups
    assert g0.batched and not g1.batched and g1.reason == "a single block"
    assert "unbatched (a single block)" in str(backend.reports[0])


def test_ops_without_batching_rule_run_unbatched(monkeypatch):
    """Traced at two batch sizes, an op vmap would loop over is found and named. (The
    recomputing backward vmaps the block's forward, batch norm's functional op included; the
    saved-activation backward vmaps only autograd's native_batch_norm_backward, which has a
    batching rule.)"""
    import hbp_compile.analysis.batching as batching
    from models import BNResNet

    monkeypatch.setattr(batching, "VMAP_DECOMPOSED", ())       # no decomposition: no rule
    torch.manual_seed(4)
    model = BNResNet().double()
    x = torch.randn(5, 8, dtype=torch.double)
    _, want = oracle(model, (x,), 2)
    _, got, backend = compiled(model, (x,), 2, recompute=True)
    (group,) = backend.reports[0].streams[0].groups
    assert not group.batched and "_native_batch_norm_legit_functional" in group.reason
    assert max_rel_err(got, want) < 1e-10, worst_param(got, want)


def test_counters():
    counters.clear()
    torch.manual_seed(5)
    model = GPT(n_layer=2).double()
    compiled(model, model.example_inputs(2), 2)
    c = counters["hbp_compile"]
    assert c["streams_rewritten"] == 1 and c["blocks_rewritten"] == 4
    assert c["groups_batched"] == 2 and c["groups_unbatched"] == 0
    assert c["block_vjps"] == 2 * 3                                 # 2 groups x (2 rounds + final)


def _round_bmm_sizes(backend) -> dict:
    """(round, group) -> the leading sizes of the batched matmuls of its VJP."""
    sizes: dict = {}
    for n in backend.reports[0].graphs["backward"].graph.nodes:
        tags = n.meta.get("custom") or {}
        if n.target is torch.ops.aten.bmm.default and str(tags.get("hbp_round")) != "final":
            sizes.setdefault((int(tags["hbp_round"]), int(tags["hbp_group"])), set()).add(
                n.meta["val"].shape[0])
    return sizes


@pytest.mark.parametrize("name, k", [("resmlp", 2), ("resmlp", 4), ("gpt", 3), ("gpt", 8)])
def test_batched_rounds_run_over_the_live_members_only(name, k):
    """A batched round's VJP runs over the rows of its stacks that can change a gradient
    (live_blocks: converged members reuse the round before's value, those below k - r are
    dead): its matmuls' leading axes (members, or members x batch x heads in attention) are
    those of k = 1, where round 1 runs every member, scaled by the members it runs. At k > L
    the early rounds run nothing and the late ones one member each, and it is still exact."""
    torch.manual_seed(seed_of(name, k))
    model = MODELS[name]()
    inputs = model.example_inputs(3)
    _, _, full = compiled(model, inputs, 1)
    torch._dynamo.reset()
    _, got, backend = compiled(model, inputs, k)
    (stream,) = backend.reports[0].streams
    L = stream.length
    want = exact(model, inputs)[1] if k >= L else oracle(model, inputs, k)[1]
    assert max_rel_err(got, want) < 1e-10, worst_param(got, want)
    assert all(g.batched for g in stream.groups)
    per_member = {gi: {s // len(stream.groups[gi].members) for s in full_sizes}
                  for (r, gi), full_sizes in _round_bmm_sizes(full).items()}
    expected = {}
    for r in range(1, k + 1):
        computed = set(live_blocks(L, k, r)) if k < L else {k - r} & set(range(L))
        for gi, g in enumerate(stream.groups):
            if c := len(computed & set(g.members)):
                expected[(r, gi)] = {c * f for f in per_member[gi]}
    assert _round_bmm_sizes(backend) == expected
