"""HuggingFace models under hbp_backend: one training step each, the report, and how close the
Highway-BP gradient is to exact backprop.

    python examples/hf_models.py                      # Inductor codegen (slow to compile on CPU)
    python examples/hf_models.py --codegen eager      # a couple of minutes on CPU
    python examples/hf_models.py --models gpt2 bert --iters 4

Tiny configurations, random weights, train mode, dropout 0 (so that the exact reference sees
the same function). Each model: compile a copy with hbp_backend(iters), forward + backward +
AdamW step; an eager copy gives the exact gradients of the same batch. Printed: every graph's
report, the coverage (residual blocks whose backward was rewritten), the gradient cosine
similarity overall and for the worst parameter, and the loss before and after the step.

Parameters whose exact gradient is (numerically) zero are left out of the worst-parameter
cosine: ViT's and BERT's attention key biases, whose gradient is zero by symmetry (softmax is
invariant to the q . b_k shift they add to each score row), so their cosine compares rounding
noise with rounding noise.
"""
import argparse
import copy
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import torch._dynamo  # noqa: E402

from hbp_compile import hbp_backend  # noqa: E402

V, S, B = 64, 16, 4


def _ids():
    return torch.randint(0, V, (B, S))


def build(name, n_layer):
    """(model, inputs, stream length L that iters >= L would make exact)."""
    import transformers as T

    if name == "gpt2":
        cfg = T.GPT2Config(n_layer=n_layer, n_embd=64, n_head=4, vocab_size=V, n_positions=64,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
        ids = _ids()
        return T.GPT2LMHeadModel(cfg), {"input_ids": ids, "labels": ids}
    if name == "llama":
        cfg = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=n_layer,
                            num_attention_heads=4, num_key_value_heads=2, vocab_size=V,
                            max_position_embeddings=64, use_cache=False)
        ids = _ids()
        return T.LlamaForCausalLM(cfg), {"input_ids": ids, "labels": ids}
    if name == "bert":
        cfg = T.BertConfig(vocab_size=V, hidden_size=64, num_hidden_layers=n_layer,
                           num_attention_heads=4, intermediate_size=128,
                           max_position_embeddings=64, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)
        ids, labels = _ids(), _ids()
        labels[torch.rand(B, S) > 0.3] = -100            # MLM: a loss on ~30% of the tokens
        return T.BertForMaskedLM(cfg), {"input_ids": ids, "labels": labels}
    if name == "vit":
        cfg = T.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=64,
                          num_hidden_layers=n_layer, num_attention_heads=4,
                          intermediate_size=128, num_labels=10, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0)
        return T.ViTForImageClassification(cfg), {"pixel_values": torch.randn(B, 3, 32, 32),
                                                  "labels": torch.randint(0, 10, (B,))}
    if name == "resnet":
        # basic layers, no projection in stage 0 (embedding_size == hidden_sizes[0]); stage 1
        # starts with a projection shortcut, a step of the same stream (its dense K_l is the
        # shortcut's VJP): one stream of 2 x n_layer blocks
        cfg = T.ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32],
                             depths=[n_layer, n_layer], layer_type="basic", num_labels=10)
        return T.ResNetForImageClassification(cfg), {"pixel_values": torch.randn(B, 3, 32, 32),
                                                     "labels": torch.randint(0, 10, (B,))}
    if name == "mamba":
        cfg = T.MambaConfig(vocab_size=V, hidden_size=64, state_size=8,
                            num_hidden_layers=n_layer, expand=2, conv_kernel=4, use_cache=False)
        ids = _ids()
        return T.MambaForCausalLM(cfg), {"input_ids": ids, "labels": ids}
    raise KeyError(name)


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(),
                                                 dim=0).item()


def run(name, args):
    torch.manual_seed(0)
    model, inputs = build(name, args.layers)
    model.train()
    exact = copy.deepcopy(model)
    print(f"=== {name}: {type(model).__name__}, {args.layers} layers, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters ===")

    backend = hbp_backend(iters=args.iters, codegen=args.codegen)
    cmodel = torch.compile(model, backend=backend)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    t0 = time.time()
    loss = cmodel(**inputs).loss
    loss.backward()
    seconds = time.time() - t0

    exact(**inputs).loss.backward()

    for report in backend.reports:
        print(report)
    steps = sum(r.residual_steps for r in backend.reports)
    rewritten = sum(r.rewritten_blocks for r in backend.reports)
    lengths = [s.length for r in backend.reports for s in r.streams]
    print(f"coverage: {rewritten}/{steps} residual blocks rewritten "
          f"({100 * rewritten / steps if steps else 0:.0f}%) in {len(backend.reports)} graph(s); "
          f"stream lengths {lengths or '-'}; compile + first step {seconds:.1f} s")

    named = [(n, p.grad, q.grad) for (n, p), q in zip(model.named_parameters(), exact.parameters())
             if q.grad is not None]
    got = torch.cat([g.flatten() for _, g, _ in named])
    want = torch.cat([w.flatten() for _, _, w in named])
    scale = max(w.norm().item() for _, _, w in named)
    per = {n: cosine(g, w) for n, g, w in named if w.norm().item() > 1e-6 * scale}
    worst = min(per, key=per.get)
    note = "exact: every stream has L <= iters" if lengths and max(lengths) <= args.iters else \
        "no stream: exact backprop" if not lengths else f"iters={args.iters} < L={max(lengths)}"
    print(f"gradient cosine vs exact backprop: overall {cosine(got, want):.6f}, worst parameter "
          f"{worst} {per[worst]:.6f}  ({note}; "
          f"{len(named) - len(per)} parameter(s) with ~0 exact gradient left out)")

    opt.step()
    opt.zero_grad(set_to_none=True)
    after = cmodel(**inputs).loss          # the same compiled graph, no backward
    print(f"loss {loss.item():.4f} -> {after.item():.4f} after one AdamW step\n")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["gpt2", "llama", "vit", "bert", "resnet",
                                                   "mamba"])
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--codegen", default="inductor", choices=["inductor", "eager"])
    p.add_argument("--layers", type=int, default=3,
                   help="layers per model (ResNet: layers per stage); transformers have 2 "
                        "residual blocks per layer, so L = 2 x layers")
    args = p.parse_args()
    torch._dynamo.config.cache_size_limit = 64
    for name in args.models:
        torch._dynamo.reset()
        run(name, args)


if __name__ == "__main__":
    main()
