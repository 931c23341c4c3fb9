"""Each limitation in tests/limitations.py: the report gives its reason, the gradients are still
exact autograd's (at k >= L), and README.md's "Limitations" section is generated from the list."""
import copy
import os

import pytest
import torch

from hbp_compile import hbp_backend
from helpers import max_rel_err, worst_param
from limitations import LIMITATIONS, markdown, reasons, section


@pytest.mark.parametrize("lim", LIMITATIONS, ids=[x.reason for x in LIMITATIONS])
def test_limitation_is_reported_and_exact(lim):
    torch.manual_seed(0)
    model = lim.model().double()
    inputs = lim.inputs()
    ref = copy.deepcopy(model)
    ref(*inputs).backward()
    want = {n: p.grad for n, p in ref.named_parameters()}
    backend = hbp_backend(iters=8, codegen="eager", **lim.options)
    m = copy.deepcopy(model)
    torch.compile(m, backend=backend, dynamic=lim.dynamic or None)(*inputs).backward()
    got = {n: p.grad for n, p in m.named_parameters()}
    said = [r for report in backend.reports for r in reasons(report)]
    assert any(lim.reason in r for r in said), said
    assert max_rel_err(got, want) < 1e-10, worst_param(got, want)


def test_readme_limitations_section_is_generated_from_the_list():
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    assert section(readme) == markdown(), "run: python tests/limitations.py --write README.md"
