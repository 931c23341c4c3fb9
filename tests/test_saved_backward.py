"""The saved-activation backward: no forward recomputed in the rounds, norm affines folded.

Every block's template is split once into a forward that saves activations and a backward that
reads them; the final VJP folds a leading norm's affine weights into its linears' dW. The
oracles are the same as everywhere: eager autograd (exact at k >= L) and the eager iteration in
tests/oracle.py. recompute=True (the re-linearising backward) is checked against both too.
"""
import pytest
import torch
from torch._dynamo.utils import counters

from helpers import compiled, exact, live_blocks, max_rel_err, oracle, worst_param
from models import GPT, NormStack, ResMLP, SDPAStack, TiedSteps

MODELS = {
    "resmlp": lambda: ResMLP(n_blocks=5),
    "gpt": lambda: GPT(n_layer=2),
    "sdpa": lambda: SDPAStack(n_blocks=3),
    "tied": lambda: TiedSteps(steps=4),
    "norm_fan3": lambda: NormStack(fan=3),
    "norm_nobias": lambda: NormStack(bias=False),
    "norm_noaffine": lambda: NormStack(affine=False),
    "norm_side_path": lambda: NormStack(side_path=True),
}
# norms folded per group: a norm feeding only linears with its affine weights
FOLDED = {"resmlp": 1, "gpt": 1, "sdpa": 1, "tied": 1, "norm_fan3": 1, "norm_nobias": 1,
          "norm_noaffine": 0, "norm_side_path": 0}
MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default}


def _build(name, seed):
    torch.manual_seed(seed)
    model = MODELS[name]().double()
    return model, model.example_inputs(3)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("batched", [True, False])
def test_exact_at_L_with_saved_activations_and_folding(name, batched):
    model, inputs = _build(name, 11 + len(name))
    _, want = exact(model, inputs)
    counters.clear()
    _, got, backend = compiled(model, inputs, 12, batched=batched)
    assert max_rel_err(got, want) < 1e-10, worst_param(got, want)
    (stream,) = backend.reports[0].streams
    assert stream.length <= 12
    for g in stream.groups:
        assert g.saved >= 0 and not g.recompute_reason       # the saving path, not recompute
        assert g.folded_norms == FOLDED[name], (name, g.folded_norms)
    assert counters["hbp_compile"]["groups_saved"] == len(stream.groups)
    assert counters["hbp_compile"]["norms_folded"] == FOLDED[name] * len(stream.groups)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("k", [0, 2])
def test_saved_and_recomputed_equal_the_oracle(name, k):
    model, inputs = _build(name, 31 * k + len(name))
    _, want = oracle(model, inputs, k)
    _, saved, _ = compiled(model, inputs, k)
    torch._dynamo.reset()
    _, again, backend = compiled(model, inputs, k, recompute=True)
    assert max_rel_err(saved, want) < 1e-10, worst_param(saved, want)
    assert max_rel_err(again, want) < 1e-10, worst_param(again, want)
    for g in backend.reports[0].streams[0].groups:
        assert g.saved == -1 and g.recompute_reason == "recompute=True"
    # k < L really is an approximation here: the comparison could fail
    _, exact_grads = exact(model, inputs)
    assert max_rel_err(saved, exact_grads) > 1e-6


def _tagged_matmuls(backend):
    """Matmul nodes of the backward graph per Highway-BP round (from the VJP annotations)."""
    out = {}
    for n in backend.reports[0].graphs["backward"].graph.nodes:
        r = (n.meta.get("custom") or {}).get("hbp_round")
        if r is not None and n.target in MATMULS:
            out[str(r)] = out.get(str(r), 0) + 1
    return out


@pytest.mark.parametrize("batched", [True, False])
def test_backward_runs_the_arithmetic_floor(batched):
    """ResMLP blocks LN -> fc1 -> GELU -> fc2: a round is 2 input-side matmuls per VJP; the final
    VJP 3 (dW of fc1 and fc2, fc2's input gradient; fc1's input gradient is folded away).
    Recomputing the forward in the backward would add its matmuls."""
    model, inputs = _build("resmlp", 5)
    k, L = 2, 5
    _, _, backend = compiled(model, inputs, k, batched=batched)
    if batched:
        assert _tagged_matmuls(backend) == {"1": 2, "2": 2, "final": 3}
    else:   # the live blocks only; a final VJP at a converged g^k_{l+1} (l >= L - k) shares
        # its input-gradient matmul with the last round that computed it (CSE)
        assert _tagged_matmuls(backend) == {
            "1": 2 * len(live_blocks(L, k, 1)), "2": 2 * len(live_blocks(L, k, 2)),
            "final": 3 * L - min(k, L)}
    # the re-linearising backward (recompute=True): batched, its vmapped forward runs again
    # inside the backward (fc1 only: fc2's output is dead there, as the issue's "half a
    # forward"); unbatched, AOTAutograd's CSE merges it with the stream's forward
    totals = []
    for recompute in (False, True):
        torch._dynamo.reset()
        _, _, b = compiled(model, inputs, k, batched=batched, recompute=recompute, fold=False)
        totals.append(sum(n.target in MATMULS
                          for n in b.reports[0].graphs["backward"].graph.nodes))
    assert totals[1] - totals[0] == (1 if batched else 0), totals


def test_sdpa_backward_runs_once_per_group_and_round():
    """The member axis is folded into SDPA's batch axis: one native kernel call per round."""
    model, inputs = _build("sdpa", 3)
    _, got, backend = compiled(model, inputs, 2)
    _, want = oracle(model, inputs, 2)
    assert max_rel_err(got, want) < 1e-10, worst_param(got, want)
    per_round = {}
    for n in backend.reports[0].graphs["backward"].graph.nodes:
        r = (n.meta.get("custom") or {}).get("hbp_round")
        if r is not None and "scaled_dot_product" in str(n.target):
            per_round[str(r)] = per_round.get(str(r), 0) + 1
    assert per_round == {"1": 1, "2": 1, "final": 1}


def test_fold_off_gives_the_same_gradients():
    model, inputs = _build("norm_fan3", 8)
    _, folded, b1 = compiled(model, inputs, 1)
    torch._dynamo.reset()
    _, plain, b2 = compiled(model, inputs, 1, fold=False)
    assert b1.reports[0].streams[0].groups[0].folded_norms == 1
    assert b2.reports[0].streams[0].groups[0].folded_norms == 0
    assert max_rel_err(folded, plain) < 1e-12, worst_param(folded, plain)


@pytest.mark.parametrize("scan", ["chunked", "log-depth"])
def test_identity_stream_with_each_scan_equals_the_oracle(scan):
    """The reverse sum of an identity stream as a chunked or doubling scan (auto's choices
    past SEQUENTIAL_MAX on a CPU and a GPU), forced on a short stream."""
    model, inputs = _build("resmlp", 17)
    _, want = oracle(model, inputs, 2)
    _, got, backend = compiled(model, inputs, 2, scan=scan)
    assert max_rel_err(got, want) < 1e-10, worst_param(got, want)
    assert backend.reports[0].streams[0].scan == \
        {"chunked": "chunked reverse sum", "log-depth": "reverse cumsum"}[scan]
