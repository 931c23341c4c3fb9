"""explain(), HBP_LOG, the command line, fidelity() and calibrate_iters()."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import hbp_compile
from helpers import exact, oracle
from models import GPT, BNResNet, BreakMLP, InjectedHead

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_explain_reports_without_touching_the_model():
    torch.manual_seed(0)
    model = BNResNet(n=3).double()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(4, 8, dtype=torch.double, requires_grad=True)
    result = hbp_compile.explain(model, x, iters=1)
    assert [s.length for r in result.reports for s in r.streams] == [3]
    assert result.coverage == 1.0 and result.graph_breaks == []
    assert all(p.grad is None for p in model.parameters()) and x.grad is None
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k               # BatchNorm statistics unchanged
    text = str(result)
    assert "3/3 residual blocks rewritten" in text and "blocks.0[0, 1, 2]" in text


def test_explain_passes_model_keyword_inputs():
    torch.manual_seed(5)
    model = GPT(n_layer=2).double()
    idx, targets = model.example_inputs(2)
    result = hbp_compile.explain(model, idx, targets=targets, iters=1, gamma=0.0)
    assert [s.length for r in result.reports for s in r.streams] == [4]


def test_explain_lists_graph_breaks_and_per_graph_streams():
    torch.manual_seed(1)
    model = BreakMLP(n_blocks=5).double()
    result = hbp_compile.explain(model, *model.example_inputs(2), iters=2)
    assert len(result.reports) == 2
    assert sorted(s.length for r in result.reports for s in r.streams) == [2, 3]
    assert len(result.graph_breaks) == 1 and "graph_break" in result.graph_breaks[0]
    assert json.loads(result.dumps())["residual_blocks"] == 5


def _run(code, env=None):
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_hbp_log_env_prints_report_and_graphs():
    code = ("import sys, torch; sys.path.insert(0, 'tests'); from models import ResMLP; "
            "from hbp_compile import hbp_backend; m = ResMLP(n_blocks=3); "
            "torch.compile(m, backend=hbp_backend(1, codegen='eager'))(*m.example_inputs(2))"
            ".backward()")
    quiet = _run(code)
    assert quiet.returncode == 0, quiet.stderr
    assert "[hbp_compile]" not in quiet.stderr
    loud = _run(code, {"HBP_LOG": "report,graphs"})
    assert loud.returncode == 0, loud.stderr
    assert "[hbp_compile] hbp_compile graph 0" in loud.stderr and "L=3" in loud.stderr
    assert "graph 0 rewritten:" in loud.stderr and "graph 0 backward:" in loud.stderr
    bad = _run("import hbp_compile", {"HBP_LOG": "nonsense"})
    assert bad.returncode != 0 and "unknown artifact" in bad.stderr


def test_cli_explain(tmp_path):
    cmd = [sys.executable, "-m", "hbp_compile", "explain", "examples/explain_target.py:tiny_gpt",
           "--iters", "1", "--dump", str(tmp_path)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "4/4 residual blocks rewritten" in out.stdout and "transformer.h.1[ln_2, mlp]" in out.stdout
    assert (tmp_path / "graph_0_report.json").exists() and (tmp_path / "graph_0_backward.py").exists()
    js = subprocess.run(cmd[:-2] + ["--json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert json.loads(js.stdout)["graphs"][0]["streams"][0]["length"] == 4
    bad = subprocess.run([sys.executable, "-m", "hbp_compile", "explain", "nofile.py:f"], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "no such file" in bad.stderr


def _cosine(got, want, names):
    a = torch.cat([got[n].flatten() for n in names])
    b = torch.cat([want[n].flatten() for n in names])
    return F.cosine_similarity(a, b, dim=0).item(), ((a - b).norm() / b.norm()).item()


def test_fidelity_matches_oracle_numbers():
    """Cosines and errors per k and per layer, recomputed here from the eager oracle."""
    torch.manual_seed(2)
    model = GPT(n_layer=2).double()
    inputs = model.example_inputs(2)
    result = hbp_compile.fidelity(model, inputs, iters=[0, 1, 4])
    _, want = exact(model, inputs)
    params = [n for n, _ in model.named_parameters()]
    previous = None
    for k in (0, 1, 4):
        _, got = oracle(model, inputs, k)
        row = result.row(k)
        cos, rel = _cosine(got, want, params)
        assert row.overall.cosine == pytest.approx(cos, abs=1e-12)
        assert row.overall.rel_error == pytest.approx(rel, rel=1e-8, abs=1e-13)
        c_attn = [n for n in params if n.startswith("transformer.h.0.attn.c_attn.")]
        assert row.layers["transformer.h.0.attn.c_attn"].cosine == \
            pytest.approx(_cosine(got, want, c_attn)[0], abs=1e-12)
        if previous is not None:
            added = torch.cat([(got[n] - previous[n]).flatten() for n in params]).norm()
            assert row.round_share == pytest.approx(
                (added / torch.cat([want[n].flatten() for n in params]).norm()).item(), rel=1e-8)
        previous = got
    assert result.row(4).overall.rel_error < 1e-10 and result.row(0).overall.cosine < 0.9999
    assert "overall cosine" in str(result) and "k=4" in str(result)


def test_fidelity_plot(tmp_path):
    pytest.importorskip("matplotlib")
    torch.manual_seed(3)
    model = InjectedHead(n_blocks=4, tap=2).double()
    result = hbp_compile.fidelity(model, model.example_inputs(3), iters=[0, 1, 2])
    path = result.plot(str(tmp_path / "fidelity.png"))
    assert os.path.getsize(path) > 1000


def test_calibrate_iters_finds_the_smallest_k():
    torch.manual_seed(4)
    model = GPT(n_layer=2).double()
    inputs = model.example_inputs(2)
    _, want = exact(model, inputs)
    params = [n for n, _ in model.named_parameters()]
    cos = [_cosine(oracle(model, inputs, k)[1], want, params)[0] for k in range(3)]
    assert cos[0] < cos[1] < cos[2]
    target = (cos[1] + cos[2]) / 2                  # met first at k = 2
    assert hbp_compile.calibrate_iters(model, inputs, target_cosine=target) == 2
    with pytest.raises(ValueError, match="max_iters"):
        hbp_compile.calibrate_iters(model, inputs, target_cosine=target, max_iters=1)
