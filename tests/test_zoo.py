"""The model zoo (tests/zoo.py) under hbp_backend, float64, eager codegen.

Per architecture: no graph falls back as a whole; at least 90% of the residual blocks of the
model's DEFINITION are rewritten (zoo.Entry.blocks, not the pass's own count), each once; at
iters >= L the gradients are exact autograd's (per parameter, relative error < 1e-10, floored
at 1e-4 of the largest gradient for gradients that are zero by symmetry); at iters = 1 they are
not (so the exactness check could fail). Entries marked default run in `make test`, the rest
under --runslow (`make test-all`).
"""
import pytest

import zoo
from helpers import max_rel_err, worst_param

FLOOR = 1e-4
PARAMS = [pytest.param(name, marks=() if e.default else pytest.mark.slow)
          for name, e in zoo.ZOO.items()]


def test_zoo_is_large_and_varied():
    assert len(zoo.ZOO) >= 30
    assert {e.family for e in zoo.ZOO.values()} == {"transformers", "torchvision", "torch.nn"}


@pytest.mark.parametrize("name", PARAMS)
def test_zoo(name):
    entry = zoo.ZOO[name]
    model, inputs = zoo.build(name)
    want = zoo.exact(name, model, inputs)
    # no stream is longer than the model's residual blocks: iters = blocks is exact
    got, backend = zoo.compiled(model, inputs, entry.blocks)
    reports = backend.reports
    text = "\n".join(map(str, reports))
    assert not [r.fallback_reason for r in reports if r.fallback_reason], text

    streams = [s for r in reports for s in r.streams]
    rewritten = sum(r.rewritten_blocks for r in reports)
    assert 0.9 * entry.blocks <= rewritten <= entry.blocks, text
    # each residual block once (ALBERT shares one layer's modules across depth: its blocks
    # share module paths, not nodes)
    firsts = [b.first for s in streams for b in s.blocks]
    assert len(set(firsts)) == len(firsts), text
    assert None not in [b.module_path for s in streams for b in s.blocks], text
    assert all(s.length >= 2 for s in streams), text

    assert max_rel_err(got, want, floor=FLOOR) < 1e-10, worst_param(got, want)
    approx, _ = zoo.compiled(model, inputs, 1)
    assert max_rel_err(approx, want, floor=FLOOR) > 1e-6


def test_moe_graph_breaks_are_reported_with_a_hint():
    """Mixtral with eager experts (a Python loop over the experts a batch hits) breaks the
    graph at its routing: the report names the break and says what to use instead."""
    import torch
    import transformers as T

    from hbp_compile import hbp_backend

    cfg = T.AutoConfig.for_model("mixtral", **zoo.TEXT, num_local_experts=4,
                                 num_experts_per_tok=2, experts_implementation="eager")
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(cfg)
    ids = torch.randint(3, zoo.V, (zoo.B, zoo.S))
    backend = hbp_backend(iters=1, codegen="eager")
    torch.compile(model, backend=backend)(input_ids=ids, labels=ids).loss.backward()
    assert len(backend.reports) > 1
    text = "\n".join(map(str, backend.reports))
    assert "graph break before this graph" in text and "experts_implementation" in text, text
