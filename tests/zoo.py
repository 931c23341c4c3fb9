"""A zoo of third-party architectures, built as a new user would build them.

HuggingFace transformers models from tiny configs (random weights), torchvision's own model
files, and PyTorch's nn.Transformer*. Each entry says how many residual blocks the model's
DEFINITION has (not what the pass finds): one residual addition x + f(x) is one block, so a
transformer layer has two (attention, MLP), a decoder layer with cross-attention three, a
parallel-attention layer (x + attn(ln x) + mlp(ln x): GPT-J, Phi, Falcon) one, a ResNet basic or
bottleneck block one, projection-shortcut blocks included.

tests/test_zoo.py checks every entry; README.md's coverage table is rendered from the same runs:

    python tests/zoo.py --write README.md          # about ten minutes on two CPU cores
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import importlib.machinery
import importlib.util
import os
import re
import sys
import time
import types
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

V, S, B = 64, 8, 2          # vocabulary, tokens, batch
LAYERS = 2                  # layers (transformers) or blocks per stage (convnets)


@dataclasses.dataclass
class Entry:
    name: str
    family: str                             # where the code comes from
    build: Callable[[], tuple]              # -> (model, inputs dict): loss = model(**inputs)
    blocks: int                             # residual blocks in the model's definition
    default: bool = False                   # in the default test run (the rest: --runslow)
    # the exact reference: eager autograd, or the exact compile where eager cannot run the
    # model in float64 (transformers' MoE experts call grouped_mm eagerly, which has no float64
    # CPU kernel; compiled, they call their fallback custom op)
    reference: str = "eager"


# ---------------------------------------------------------------- HuggingFace transformers

TEXT = dict(hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=128, vocab_size=V,
            max_position_embeddings=64, use_cache=False, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)
IMAGE = dict(image_size=32, num_channels=3, patch_size=8, hidden_size=64,
             num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=128)
CONV = dict(num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[LAYERS, LAYERS])


def _no_dropout(cfg):
    """Dropout probabilities to 0: the exact reference is eager autograd on a copy, which
    draws other masks (tests/test_randomness.py covers dropout against the exact compile)."""
    for k, v in cfg.to_dict().items():
        if isinstance(v, float) and any(s in k for s in ("dropout", "pdrop", "drop_path",
                                                         "layerdrop")):
            setattr(cfg, k, 0.0)


def _hf(model_type, head, **kw):
    def build():
        import transformers as T

        base = dict(TEXT) if head in ("causal", "mlm", "s2s") else {}
        cfg = T.AutoConfig.for_model(model_type, **{**base, **kw})
        _no_dropout(cfg)
        ids = torch.randint(3, V, (B, S))
        if head == "causal":
            return T.AutoModelForCausalLM.from_config(cfg), dict(input_ids=ids, labels=ids)
        if head == "mlm":
            return T.AutoModelForMaskedLM.from_config(cfg), dict(input_ids=ids, labels=ids)
        if head == "s2s":
            return T.AutoModelForSeq2SeqLM.from_config(cfg), dict(input_ids=ids, labels=ids)
        cfg.num_labels = 10
        return T.AutoModelForImageClassification.from_config(cfg), \
            dict(pixel_values=torch.randn(B, 3, 32, 32), labels=torch.randint(0, 10, (B,)))
    return build


def _hf_entries():
    L = LAYERS
    seq, par = 2 * L, L
    return [
        Entry("gpt2", "transformers", _hf("gpt2", "causal"), seq, True),
        Entry("llama", "transformers", _hf("llama", "causal"), seq),
        Entry("mistral", "transformers", _hf("mistral", "causal"), seq),
        Entry("qwen2", "transformers", _hf("qwen2", "causal"), seq),
        Entry("gemma", "transformers", _hf("gemma", "causal", head_dim=16), seq),
        Entry("gemma2", "transformers", _hf("gemma2", "causal", head_dim=16), seq),
        Entry("phi", "transformers", _hf("phi", "causal"), par),
        Entry("phi3", "transformers", _hf("phi3", "causal"), seq),
        Entry("opt", "transformers", _hf("opt", "causal", ffn_dim=128), seq, True),
        Entry("gpt_neo", "transformers", _hf("gpt_neo", "causal", num_layers=L, window_size=4,
                                             attention_types=[[["global", "local"], L // 2]]),
              seq),
        Entry("gptj", "transformers", _hf("gptj", "causal", rotary_dim=8), par),
        Entry("gpt_neox", "transformers", _hf("gpt_neox", "causal"), par),
        Entry("bloom", "transformers", _hf("bloom", "causal", n_layer=L, n_head=4), seq),
        Entry("falcon", "transformers", _hf("falcon", "causal"), par),
        Entry("stablelm", "transformers", _hf("stablelm", "causal"), seq),
        Entry("olmo", "transformers", _hf("olmo", "causal"), seq),
        Entry("starcoder2", "transformers", _hf("starcoder2", "causal"), seq),
        Entry("granite", "transformers", _hf("granite", "causal"), seq),
        Entry("cohere", "transformers", _hf("cohere", "causal"), par),
        Entry("codegen", "transformers", _hf("codegen", "causal", n_layer=L, n_embd=64, n_head=4,
                                             rotary_dim=8), par),
        Entry("mixtral", "transformers", _hf("mixtral", "causal", num_local_experts=4,
                                             num_experts_per_tok=2), seq, True, "aot_eager"),
        Entry("qwen2_moe", "transformers", _hf("qwen2_moe", "causal", num_experts=4,
                                               num_experts_per_tok=2, moe_intermediate_size=32,
                                               shared_expert_intermediate_size=32), seq,
              reference="aot_eager"),
        Entry("rwkv", "transformers", _hf("rwkv", "causal", attention_hidden_size=64,
                                          context_length=64), seq, True),
        # residual_in_fp32 off: in a float64 model that cast rounds the stream to float32
        # (the pass then rightly leaves it exact; in a float32 model it is a no-op)
        Entry("mamba", "transformers", _hf("mamba", "causal", state_size=8,
                                           residual_in_fp32=False), L),
        Entry("bert", "transformers", _hf("bert", "mlm"), seq),
        Entry("roberta", "transformers", _hf("roberta", "mlm"), seq),
        Entry("distilbert", "transformers", _hf("distilbert", "mlm", dim=64, n_layers=L,
                                                n_heads=4, hidden_dim=128), seq),
        Entry("albert", "transformers", _hf("albert", "mlm", embedding_size=32), seq),
        Entry("electra", "transformers", _hf("electra", "mlm", embedding_size=64), seq),
        Entry("deberta_v2", "transformers", _hf("deberta-v2", "mlm"), seq),
        Entry("mpnet", "transformers", _hf("mpnet", "mlm"), seq),
        Entry("t5", "transformers", _hf("t5", "s2s", d_model=64, d_ff=128, num_layers=L,
                                        num_heads=4, d_kv=16, decoder_start_token_id=0),
              2 * L + 3 * L, True),
        Entry("bart", "transformers", _hf("bart", "s2s", d_model=64, encoder_layers=L,
                                          decoder_layers=L, encoder_attention_heads=4,
                                          decoder_attention_heads=4, encoder_ffn_dim=128,
                                          decoder_ffn_dim=128, decoder_start_token_id=2),
              2 * L + 3 * L),
        Entry("vit", "transformers", _hf("vit", "image", **IMAGE), seq),
        Entry("beit", "transformers", _hf("beit", "image", **IMAGE), seq),
        Entry("dinov2", "transformers", _hf("dinov2", "image", **{**IMAGE, "mlp_ratio": 2}),
              seq),
        Entry("swin", "transformers", _hf("swin", "image", image_size=32, num_channels=3,
                                          patch_size=2, embed_dim=16, depths=[L, L],
                                          num_heads=[2, 2], window_size=4), 2 * 2 * L, True),
        Entry("hf_resnet", "transformers", _hf("resnet", "image", **CONV, layer_type="basic"),
              2 * L),
        Entry("hf_resnet_bottleneck", "transformers",
              _hf("resnet", "image", **CONV, layer_type="bottleneck"), 2 * L),
        Entry("hf_convnext", "transformers", _hf("convnext", "image", num_channels=3,
                                                 hidden_sizes=[16, 32], depths=[L, L],
                                                 num_stages=2, layer_scale_init_value=0.5),
              2 * L),
        Entry("regnet", "transformers", _hf("regnet", "image", **CONV, groups_width=8), 2 * L),
    ]


# ---------------------------------------------------------------- torchvision

def torchvision_root() -> Path:
    """torchvision's sources, unpacked from its wheel by the Makefile (not installed: its
    compiled ops do not load against the CPU torch build, and an installed torchvision that
    fails to import breaks transformers' imports too)."""
    here = Path(__file__).resolve().parent.parent
    return Path(os.environ.get("HBP_TORCHVISION_SRC", here / ".venv" / "torchvision-src")) \
        / "torchvision"


def _stub(name: str, path=None) -> types.ModuleType:
    if name not in sys.modules:
        m = types.ModuleType(name)
        m.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=path is not None)
        if path is not None:
            m.__path__ = [str(path)]
        sys.modules[name] = m
    return sys.modules[name]


def load_torchvision(module: str):
    """torchvision.models.<module>, loaded as hbp_tv.models.<module> without running
    torchvision's __init__ (which loads its compiled ops); the model files need none."""
    root = torchvision_root()
    if not root.is_dir():
        raise FileNotFoundError(f"{root} (run `make venv` to unpack torchvision's sources)")
    for pkg in ("", ".models", ".transforms", ".ops"):
        _stub("hbp_tv" + pkg, root / pkg.lstrip(".").replace(".", "/"))

    class _Preset:                              # image transforms of pretrained weights
        def __init__(self, *args, **kwargs):
            pass
    presets = _stub("hbp_tv.transforms._presets")
    presets.ImageClassification = presets.ObjectDetection = presets.VideoClassification = \
        presets.SemanticSegmentation = presets.OpticalFlow = _Preset
    return importlib.import_module(f"hbp_tv.models.{module}")


def _tv(module, fn, **kw):
    def build():
        model = getattr(load_torchvision(module), fn)(num_classes=10, **kw)
        return model, dict(x=torch.randn(B, 3, 32, 32), labels=torch.randint(0, 10, (B,)))
    return build


def _tv_entries():
    return [
        Entry("tv_resnet18", "torchvision", _tv("resnet", "resnet18"), 8, True),
        Entry("tv_resnet50", "torchvision", _tv("resnet", "resnet50"), 16),
        # inverted residuals: x + f(x) only where a block keeps stride and width (10 of 17)
        Entry("tv_mobilenet_v2", "torchvision", _tv("mobilenetv2", "mobilenet_v2", dropout=0.0),
              10),
        # layer_scale: ConvNeXt's 1e-6 start makes every branch ~1e-6 of the stream, so that
        # Highway-BP at k = 1 equals exact backprop to 1e-12 (a trained model's scales are not)
        Entry("tv_convnext_tiny", "torchvision",
              _tv("convnext", "convnext_tiny", stochastic_depth_prob=0.0, layer_scale=0.5),
              3 + 3 + 9 + 3),
    ]


# ---------------------------------------------------------------- PyTorch's own modules

def _torch_encoder(norm_first):
    def build():
        layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True,
                                           norm_first=norm_first)
        return nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False), \
            dict(src=torch.randn(B, S, 64))
    return build


def _torch_transformer():
    return nn.Transformer(64, 4, LAYERS, LAYERS, 128, dropout=0.0, batch_first=True), \
        dict(src=torch.randn(B, S, 64), tgt=torch.randn(B, S, 64))


def _torch_entries():
    return [
        Entry("nn_encoder_pre_ln", "torch.nn", _torch_encoder(True), 2 * LAYERS),
        Entry("nn_encoder_post_ln", "torch.nn", _torch_encoder(False), 2 * LAYERS),
        Entry("nn_transformer", "torch.nn", _torch_transformer, 2 * LAYERS + 3 * LAYERS),
    ]


ZOO = {e.name: e for e in [*_hf_entries(), *_tv_entries(), *_torch_entries()]}


class WithLoss(nn.Module):
    """A model whose forward returns a tensor, with a loss (cross-entropy on class outputs,
    mean square otherwise) so that every entry is called as `model(**inputs).loss`."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, labels=None, **inputs):
        out = self.model(*inputs.values())
        loss = nn.functional.cross_entropy(out, labels) if labels is not None else out.square().mean()
        return types.SimpleNamespace(loss=loss)


def build(name: str, dtype=torch.float64):
    """(model in train mode, inputs): `model(**inputs).loss` is a scalar."""
    torch.manual_seed(0)
    model, inputs = ZOO[name].build()
    if ZOO[name].family != "transformers":
        model = WithLoss(model)
    model = model.to(dtype).train()
    return model, {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}


def grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()
            if p.grad is not None}


def exact(name, model, inputs):
    """Exact gradients: eager autograd on a copy (or the exact compile, see Entry.reference)."""
    import torch._dynamo

    m = copy.deepcopy(model)
    if ZOO[name].reference == "aot_eager":
        torch._dynamo.reset()
        torch.compile(m, backend="aot_eager")(**inputs).loss.backward()
    else:
        m(**inputs).loss.backward()
    return grads(m)


def compiled(model, inputs, k):
    """Gradients of `model` compiled with hbp_backend(iters=k) (eager codegen), the backend."""
    import torch._dynamo

    from hbp_compile import hbp_backend

    torch._dynamo.reset()
    m = copy.deepcopy(model)
    backend = hbp_backend(iters=k, codegen="eager")
    torch.compile(m, backend=backend)(**inputs).loss.backward()
    return grads(m), backend


def survey(name: str) -> dict:
    """One entry's row: blocks by definition, rewritten, streams, graphs, fallbacks."""
    model, inputs = build(name)
    t = time.time()
    _, backend = compiled(model, inputs, 1)
    reports = backend.reports
    return dict(name=name, family=ZOO[name].family, blocks=ZOO[name].blocks,
                rewritten=sum(r.rewritten_blocks for r in reports),
                streams=[s.length for r in reports for s in r.streams],
                kinds=sorted({s.residual_kind for r in reports for s in r.streams}),
                graphs=len(reports),
                fallbacks=[r.fallback_reason for r in reports if r.fallback_reason],
                skipped=sorted({s.reason for r in reports for s in r.skipped}),
                seconds=round(time.time() - t, 1))


def markdown(rows: list[dict]) -> str:
    covered = sum(r["rewritten"] >= 0.9 * r["blocks"] for r in rows)
    lines = [f"{len(rows)} models; {covered} with at least 90% of their residual blocks "
             f"rewritten; {sum(bool(r['fallbacks']) for r in rows)} graph fallbacks.", "",
             "| model | from | residual blocks (definition) | rewritten | coverage | streams "
             "| residual kinds |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        cov = f"{100 * r['rewritten'] / r['blocks']:.0f}%" if r["blocks"] else "-"
        lines.append(f"| {r['name']} | {r['family']} | {r['blocks']} | {r['rewritten']} | {cov} "
                     f"| {' + '.join(map(str, r['streams'])) or '-'} "
                     f"| {', '.join(r['kinds']) or '-'} |")
    return "\n".join(lines)


BEGIN, END = "<!-- zoo: generated by tests/zoo.py -->", "<!-- end zoo -->"


def section(rows) -> str:
    return f"{BEGIN}\n{markdown(rows)}\n{END}"


def main():
    args = sys.argv[1:]
    path = args[args.index("--write") + 1] if "--write" in args else None
    names = [a for a in args if not a.startswith("--") and a != path] or list(ZOO)
    rows = []
    for name in names:
        row = survey(name)
        print(row, flush=True)
        rows.append(row)
    if path is not None:
        path = Path(path)
        text = path.read_text()
        pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
        path.write_text(pattern.sub(lambda _: section(rows), text))
    else:
        print(markdown(rows))


if __name__ == "__main__":
    main()
