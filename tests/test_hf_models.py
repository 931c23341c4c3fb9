"""HuggingFace transformers models (tiny configs, random weights, train mode) under hbp_backend.

Per model: what the report finds (blocks, residual kind, coverage), exact gradients at
iters >= L (eager autograd, float32), iters = 1 against the independent eager iteration of
oracle_general.py on the stream views of hf_views.py (float64), dropout with the forward's masks,
and Mamba, whose float32 stream is found but whose residual_in_fp32 cast in a float64 model
leaves it to exact backprop.

Oracles: eager autograd on a copy of the model, and highway_backward_general on
hf_views.view_<name>, which rebuilds each forward from the HF model's own submodules.
All runs use codegen="eager" (no Inductor), so the default run stays at a few minutes.
"""
import copy

import pytest
import torch
import torch._dynamo

pytest.importorskip("transformers")

from hbp_compile import hbp_backend                                     # noqa: E402
from hf_views import BUILDERS, VIEWS                                     # noqa: E402
from models_general import stream_loss_general                           # noqa: E402
from oracle_general import highway_backward_general                     # noqa: E402

TRANSFORMERS = ["gpt2", "llama", "vit", "bert"]
MODELS = TRANSFORMERS + ["resnet"]
N_LAYER = 2
# stream length L and residual kind; ResNet depths (2, 2): one stream through both stages,
# stage 1's first layer a projection step (its shortcut is a conv + BN)
EXPECTED = {"gpt2": (4, "identity"), "llama": (4, "identity"), "vit": (4, "identity"),
            "bert": (4, "post-LN"),
            "resnet": (4, "relu-after-add + projection (relu-after-add)")}
# Dynamo graphs for model(**inputs) with labels: GPT-2's loss_function logs a warning_once
# ("loss_type=None ... default loss"), a graph break; the loss is then a graph of its own.
GRAPHS = {"gpt2": 2, "llama": 1, "vit": 1, "bert": 1, "resnet": 1}
# where the blocks of layer i live (BlockReport.module_path starts with it)
LAYER_PATH = {"gpt2": "transformer.h.{}", "llama": "model.layers.{}", "vit": "vit.layers.{}",
              "bert": "bert.encoder.layer.{}"}
# Parameters whose exact gradient is zero by symmetry: a key bias adds q . b_k to every score of
# a query row, and softmax is invariant to that shift. Their computed gradients are rounding
# noise on both sides (exact and Highway-BP), so a relative error of one noise to the other
# means nothing; `compare` checks instead that both are at noise level.
ZERO_BY_SYMMETRY = {"vit": ".attention.k_proj.bias", "bert": ".attention.self.key.bias"}


def build(name, dtype=torch.float64, **kw):
    if name == "resnet":
        return BUILDERS[name](dtype=dtype, **kw)
    return BUILDERS[name](n_layer=N_LAYER, dtype=dtype, **kw)


def param_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def run_exact(model, inputs, seed=0):
    m = copy.deepcopy(model)
    torch.manual_seed(seed)
    loss = m(**inputs).loss
    loss.backward()
    return loss.detach(), param_grads(m)


def run_compiled(model, inputs, k, seed=0, **options):
    torch._dynamo.reset()
    m = copy.deepcopy(model)
    backend = hbp_backend(iters=k, codegen="eager", **{"batched": True, **options})
    torch.manual_seed(seed)
    loss = torch.compile(m, backend=backend)(**inputs).loss
    loss.backward()
    return loss.detach(), param_grads(m), backend


def run_oracle(model, inputs, k, name):
    m = copy.deepcopy(model)
    loss, _ = highway_backward_general(*VIEWS[name](m, inputs), k)
    return loss, param_grads(m)


def compare(got, want, zero=None):
    """(worst relative error ||got - want|| / ||want||, its name) over the parameters.

    Names ending in `zero` have an exact gradient of zero (ZERO_BY_SYMMETRY): both sides must be
    below 1e-6 x the largest gradient norm, and they are left out of the relative error. (1e-6,
    about 10 float32 eps, also in float64: ViT's eager attention runs its softmax in float32,
    so its key-bias noise is float32 noise. The smallest real gradients here, BERT's query
    biases at init, are about 4e-6 of the largest.)
    """
    assert got.keys() == want.keys(), set(got) ^ set(want)
    scale = max(w.norm().item() for w in want.values())
    noise = 1e-6 * scale
    worst, worst_name = 0.0, None
    for name, w in want.items():
        if zero is not None and name.endswith(zero):
            assert w.norm().item() < noise and got[name].norm().item() < noise, \
                (name, w.norm().item(), got[name].norm().item(), noise)
            continue
        e = (got[name] - w).norm().item() / max(w.norm().item(), 1e-300)
        if e >= worst:
            worst, worst_name = e, name
    return worst, worst_name


def the_stream(backend, name):
    """The run's one stream and its graph's report; every other graph has no residual step."""
    assert len(backend.reports) == GRAPHS[name], [str(r) for r in backend.reports]
    (report,) = [r for r in backend.reports if r.streams]
    assert report.fallback_reason is None
    for r in backend.reports:
        if r is not report:
            assert r.residual_steps == 0 and r.fallback_reason is None
    (stream,) = report.streams
    return report, stream


# -----------------------------------------------------------------------------
# the views


@pytest.mark.parametrize("name", MODELS)
def test_view_reproduces_the_model_loss(name):
    """The oracle's decomposition is the model: its forward equals model(**inputs).loss."""
    model, inputs = build(name)
    want = copy.deepcopy(model)(**inputs).loss
    got = stream_loss_general(*VIEWS[name](copy.deepcopy(model), inputs))
    assert torch.allclose(got, want, rtol=1e-12, atol=0), (got.item(), want.item())
    # the oracle runs the same forward (each block once) and at k >= L is exact backprop
    L = EXPECTED[name][0]
    loss, grads = run_oracle(model, inputs, L, name)
    _, exact_grads = run_exact(model, inputs)
    assert torch.allclose(loss, want, rtol=1e-12, atol=0)
    err, worst = compare(grads, exact_grads, ZERO_BY_SYMMETRY.get(name))
    assert err < 1e-10, (worst, err)


# -----------------------------------------------------------------------------
# report and exact gradients at iters = L (float32)


@pytest.mark.parametrize("name", MODELS)
def test_report_and_exact_at_L(name):
    L, kind = EXPECTED[name]
    model, inputs = build(name, dtype=torch.float32)
    loss_ref, want = run_exact(model, inputs)
    loss, got, backend = run_compiled(model, inputs, L)
    report, stream = the_stream(backend, name)
    assert stream.length == L and stream.residual_kind == kind, str(report)
    assert all(g.batched for g in stream.groups if g.size > 1), str(report)
    paths = [b.module_path for b in stream.blocks]
    if name == "resnet":
        # one stream through both stages; block 2 (stage 1's first layer) is the projection
        # step, whose K_l^T the scan applies as its shortcut's VJP
        assert paths == ["resnet.encoder.stages.0.layers.0.layer[0, 1]",
                         "resnet.encoder.stages.0.layers.1.layer[0, 1]",
                         "resnet.encoder.stages.1.layers.0[layer, shortcut]",
                         "resnet.encoder.stages.1.layers.1.layer[0, 1]"], paths
        assert "projection step(s) [2]" in stream.scan and not stream.split, str(report)
        assert report.residual_steps == 4 and report.coverage == 1.0 and not report.skipped
    else:
        # two blocks per layer (attention, MLP), each named after its layer
        assert len(stream.groups) == 2 and [g.members for g in stream.groups] == [[0, 2], [1, 3]]
        for l, p in enumerate(paths):
            layer = LAYER_PATH[name].format(l // 2)
            assert p.startswith(layer) and p[len(layer)] in ".[", paths
        assert report.residual_steps == L and report.coverage == 1.0 and not report.skipped
    assert "coverage" in str(report)
    assert torch.allclose(loss, loss_ref, rtol=1e-6)
    err, worst = compare(got, want, ZERO_BY_SYMMETRY.get(name))
    assert err < 1e-4, (worst, err)


# -----------------------------------------------------------------------------
# iters = 1 against the eager iteration (float64)


@pytest.mark.parametrize("name", MODELS)
def test_iters1_matches_oracle(name):
    model, inputs = build(name, seed=1)
    _, want = run_oracle(model, inputs, 1, name)
    _, got, backend = run_compiled(model, inputs, 1)
    the_stream(backend, name)
    err, worst = compare(got, want, ZERO_BY_SYMMETRY.get(name))
    assert err < 1e-9, (worst, err)
    _, exact_grads = run_exact(model, inputs)
    err, _ = compare(got, exact_grads, ZERO_BY_SYMMETRY.get(name))
    assert err > 1e-6            # iters = 1 < L is an approximation: the check above can fail


# -----------------------------------------------------------------------------
# dropout: the backward reads the forward's masks


def _dropout_exact_at_L(name):
    L, kind = EXPECTED[name]
    model, inputs = build(name, drop=0.1, attn="eager")
    _, want = run_exact(model, inputs, seed=7)
    _, got, backend = run_compiled(model, inputs, L, seed=7)
    report, stream = the_stream(backend, name)
    assert stream.length == L and stream.residual_kind == kind and report.coverage == 1.0
    # groups (attention, MLP) whose blocks draw dropout masks; Llama has attention dropout only
    draws = [True, False] if name == "llama" else [True, True]
    assert ["random draw" in g.summary for g in stream.groups] == draws, str(report)
    err, worst = compare(got, want, ZERO_BY_SYMMETRY.get(name))
    assert err < 1e-9, (worst, err)
    # the masks matter: without the seed the gradients are different
    _, other = run_exact(model, inputs, seed=8)
    assert compare(other, want, ZERO_BY_SYMMETRY.get(name))[0] > 1e-3


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_dropout_exact_at_L(name):
    """Hidden and attention dropout 0.1 (eager attention: attention dropout is its own op), same
    seed before eager and compiled runs: equal gradients at iters = L, so every VJP used the
    forward's masks; and dropout inside the blocks does not cut the stream."""
    _dropout_exact_at_L(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "vit"])
def test_dropout_exact_at_L_slow(name):
    _dropout_exact_at_L(name)


# -----------------------------------------------------------------------------
# Mamba


def test_mamba_float32_stream():
    """residual_in_fp32 (default True) casts the residual to float32: in a float32 model a no-op,
    and the layers form an ordinary identity stream (mixer(norm(x)) blocks)."""
    model, inputs = BUILDERS["mamba"](n_layer=2, dtype=torch.float32)
    assert model.config.residual_in_fp32
    _, want = run_exact(model, inputs)
    _, got, backend = run_compiled(model, inputs, 2)
    (report,) = backend.reports
    (stream,) = report.streams
    assert stream.length == 2 and stream.residual_kind == "identity" and report.coverage == 1.0
    assert [b.module_path.split("[")[0] for b in stream.blocks] == \
        ["backbone.layers.0", "backbone.layers.1"]
    err, worst = compare(got, want)
    assert err < 1e-4, (worst, err)


def test_mamba_residual_in_fp32_cast_is_left_exact():
    """In a float64 model residual_in_fp32 rounds the residual to float32 before the add: no
    identity (or other known) residual, so exact backprop, and the report says why."""
    model, inputs = BUILDERS["mamba"](n_layer=2, dtype=torch.float64)
    assert model.config.residual_in_fp32
    _, want = run_exact(model, inputs)
    _, got, backend = run_compiled(model, inputs, 1)
    (report,) = backend.reports
    assert report.streams == [] and report.rewritten_blocks == 0 and report.coverage == 0.0
    assert "no residual stream found: exact backprop" in str(report)
    err, worst = compare(got, want)
    assert err < 1e-12, (worst, err)


@pytest.mark.slow
def test_mamba_float64_iters1_matches_oracle():
    """Without the float32 cast (residual_in_fp32=False) a float64 Mamba is an identity stream;
    iters = 1 equals the eager iteration on mixer(norm(x)) blocks."""
    model, inputs = BUILDERS["mamba"](n_layer=2, dtype=torch.float64, residual_in_fp32=False)
    _, want = run_oracle(model, inputs, 1, "mamba")
    _, got, backend = run_compiled(model, inputs, 1)
    assert [s.length for s in backend.reports[0].streams] == [2]
    err, worst = compare(got, want)
    assert err < 1e-9, (worst, err)
    _, exact_grads = run_exact(model, inputs)
    assert compare(got, exact_grads)[0] > 1e-6


# -----------------------------------------------------------------------------
# slower variants


@pytest.mark.slow
def test_resnet_two_stages_one_stream_exact_at_L():
    """depths (2, 3): stage 1 keeps two identity layers after its projection layer; the stream
    goes on through the projection step, all five layers rewritten, exact at iters = L."""
    model, inputs = BUILDERS["resnet"](depths=(2, 3), dtype=torch.float32)
    _, want = run_exact(model, inputs)
    _, got, backend = run_compiled(model, inputs, 5)
    (report,) = backend.reports
    assert [s.length for s in report.streams] == [5], str(report)
    assert report.residual_steps == 5 and report.coverage == 1.0 and not report.skipped
    err, worst = compare(got, want)
    assert err < 1e-4, (worst, err)


@pytest.mark.slow
@pytest.mark.parametrize("name", TRANSFORMERS)
def test_three_layers_iters2_matches_oracle(name):
    model, inputs = BUILDERS[name](n_layer=3, seed=2)
    _, want = run_oracle(model, inputs, 2, name)
    _, got, backend = run_compiled(model, inputs, 2)
    _, stream = the_stream(backend, name)
    assert stream.length == 6
    err, worst = compare(got, want, ZERO_BY_SYMMETRY.get(name))
    assert err < 1e-9, (worst, err)


# -----------------------------------------------------------------------------
# more architectures, no views: structure found and exact at L (float64)


def _more(name):
    import transformers as T

    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    if name == "gpt_neox":           # parallel residual: x + attn(ln1(x)) + mlp(ln2(x))
        cfg = T.GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3,
                              num_attention_heads=4, intermediate_size=64,
                              use_parallel_residual=True, max_position_embeddings=64)
        return T.GPTNeoXForCausalLM(cfg), dict(input_ids=ids, labels=ids)
    if name == "albert":             # post-LN, one layer's weights shared by every layer
        cfg = T.AlbertConfig(vocab_size=64, embedding_size=16, hidden_size=32,
                             num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                             max_position_embeddings=64, hidden_dropout_prob=0.0,
                             attention_probs_dropout_prob=0.0)
        return T.AlbertForMaskedLM(cfg), dict(input_ids=ids, labels=ids)
    if name == "convnext":           # LayerScale blocks, a downsampling conv between stages
        cfg = T.ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[2, 3],
                               num_stages=2, num_labels=3, drop_path_rate=0.0)
        px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1),
                         dtype=torch.float64)
        return T.ConvNextForImageClassification(cfg), dict(pixel_values=px,
                                                          labels=torch.tensor([0, 2]))
    raise KeyError(name)


# name -> ([(stream length, residual kind)] longest first, [group sizes of the first stream])
MORE = {"gpt_neox": ([(3, "identity")], [3]), "albert": ([(6, "post-LN")], [3, 3]),
        "convnext": ([(3, "identity"), (2, "identity")], [3])}


@pytest.mark.parametrize("name", MORE)
def test_more_architectures_exact_at_L(name):
    torch.manual_seed(0)
    model, inputs = _more(name)
    model = model.double().train()
    _, want = run_exact(model, inputs)
    streams_want, sizes = MORE[name]
    _, got, backend = run_compiled(model, inputs, max(L for L, _ in streams_want))
    (report,) = [r for r in backend.reports if r.streams]
    assert [(s.length, s.residual_kind) for s in report.streams] == streams_want, str(report)
    assert [g.size for g in report.streams[0].groups] == sizes, str(report)
    assert all(g.batched for s in report.streams for g in s.groups), str(report)
    if name == "albert":             # the shared layer's weights are shared captures
        assert all(g.shared_captures > 0 for g in report.streams[0].groups), str(report)
    if name == "convnext":                # stage 0's chain ends at the downsampling conv
        assert "split after x_L" in report.streams[1].split, str(report)
    err, where = compare(got, want, zero="key.bias" if name == "albert" else None)
    assert err < 1e-8, (where, err)
