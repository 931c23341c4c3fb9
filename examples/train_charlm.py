"""Time to quality on Shakespeare, character level: exact backprop vs Highway-BP at several k.

    make charlm                                      # the default variants, both models
    python examples/train_charlm.py --full           # the table of examples/README.md
    python examples/train_charlm.py --model gru --variants exact,k2,sched:0=0,0.5=2

Two models: a nanoGPT-style pre-LN GPT (tests/models.py's; 6 layers, L = 12 residual steps) and
an `nn.GRU` char LM (Highway-BP over time: L = T = 128 steps). Every variant starts from the same
weights and sees the same batches; each runs in its own process. One CPU thread.
"""
import argparse
import json
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import data  # noqa: E402
import ttq  # noqa: E402
from models import GPT  # noqa: E402  (nanoGPT-style pre-LN GPT, explicit causal attention)

# per model: size, optimisation and the run length the table uses
PRESETS = {
    "gpt": dict(block_size=64, batch_size=16, steps=1000, eval_every=50, lr=3e-3),
    "gru": dict(block_size=128, batch_size=16, steps=1000, eval_every=50, lr=5e-3),
}
DEFAULT_VARIANTS = "exact,k0,k2,sched:0=0,0.5=2"
FULL_VARIANTS = "exact,k0,k1,k2,k4,sched:0=0,0.5=2,calib"
VAL_BATCHES = 8


class CharGRU(nn.Module):
    """Embedding -> nn.GRU over time -> linear head; forward returns the mean cross-entropy."""

    def __init__(self, vocab, n_embd=64, hidden=128):
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.gru = nn.GRU(n_embd, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, idx, targets):
        h, _ = self.gru(self.wte(idx))                   # (B, T, hidden)
        logits = self.head(h)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def build(name: str, vocab: int) -> nn.Module:
    """The model, initialised from the current torch seed."""
    if name == "gpt":
        return GPT(vocab=vocab, block_size=PRESETS["gpt"]["block_size"], n_layer=6, n_head=4,
                   n_embd=64)
    if name == "gru":
        return CharGRU(vocab)
    raise ValueError(f"unknown model {name!r}: gpt or gru")


def run_one(args) -> dict:
    """Child process: train one variant of one model, write its JSON."""
    torch.set_num_threads(1)
    preset = dict(PRESETS[args.model], **{k: v for k, v in
                  (("steps", args.steps), ("eval_every", args.eval_every)) if v})
    corpus = data.shakespeare()
    gen = ttq.seed_all(args.seed)
    model = build(args.model, corpus.vocab)
    B, T = preset["batch_size"], preset["block_size"]
    val_gen = torch.Generator().manual_seed(10_000 + args.seed)
    val = [corpus.batch("val", 64, T, val_gen) for _ in range(VAL_BATCHES)]
    calib_gen = torch.Generator().manual_seed(20_000 + args.seed)   # calib variant's batches

    @torch.no_grad()
    def evaluate(m):
        return {"val_loss": sum(m(x, y).item() for x, y in val) / len(val)}

    variant = ttq.parse_variant(args.variant, preset["steps"])
    if args.gamma and not variant.exact:
        variant.name += f" gamma={args.gamma}"
    result = ttq.train(variant, model, steps=preset["steps"], eval_every=preset["eval_every"],
                       lr=preset["lr"], next_batch=lambda: corpus.batch("train", B, T, gen),
                       loss_of=lambda f, batch: f(*batch), evaluate=evaluate,
                       items_per_step=B * T, unit="tok",
                       hbp_options=dict(codegen=args.codegen, gamma=args.gamma),
                       calib_inputs=lambda: corpus.batch("train", B, T, calib_gen))
    result.update(model=args.model, seed=args.seed, preset=preset,
                  parameters=sum(p.numel() for p in model.parameters()))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="gpt,gru", help="gpt, gru or both (comma-separated)")
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help="exact, k<k>, sched:<fraction>=<k>,... (k from that fraction of the run), "
                        "calib[:<every>] (k re-chosen by hbp_compile.calibrated); comma-separated")
    p.add_argument("--full", action="store_true", help=f"variants {FULL_VARIANTS}")
    p.add_argument("--steps", type=int, default=0, help="override the preset's steps")
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--codegen", default="inductor", choices=["inductor", "eager"])
    p.add_argument("--gamma", type=float, default=0.0, help="the paper's gamma split (hbp variants)")
    p.add_argument("--results", default=None, help="results folder (default: examples/results "
                   "with --full, the committed table; else examples/results/quick)")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild table and plot from the variants' saved JSON")
    p.add_argument("--variant", help=argparse.SUPPRESS)        # child process: one variant
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        run_one(args)
        return
    specs = split_specs(FULL_VARIANTS if args.full else args.variants)
    quick = "" if args.full else "quick"       # a default run never overwrites the table
    args.results = args.results or os.path.join(ttq.EXAMPLES, "results", quick)
    for name in args.model.split(","):
        extra = ["--model", name, "--seed", str(args.seed), "--codegen", args.codegen,
                 "--gamma", str(args.gamma)]
        extra += ["--steps", str(args.steps)] if args.steps else []
        extra += ["--eval-every", str(args.eval_every)] if args.eval_every else []
        out_dir = os.path.join(args.results, f"charlm_{name}")
        results = ttq.load_variants(specs, out_dir) if args.report_only else \
            ttq.run_variants(__file__, specs, out_dir, extra)
        L = "12 residual steps" if name == "gpt" else f"T = {PRESETS['gru']['block_size']} steps"
        ttq.report(results, f"charlm_{name}", args.results, "val_loss", "val loss",
                   higher_is_better=False, tolerance=0.01, relative=True, fmt="{:.3f}",
                   title=f"char-level Shakespeare, {name} (L = {L})")


def split_specs(text: str) -> list[str]:
    """'exact,k0,sched:0=0,0.5=2' -> ['exact', 'k0', 'sched:0=0,0.5=2']."""
    specs = []
    for item in text.split(","):
        if specs and specs[-1].startswith("sched:") and "=" in item and ":" not in item:
            specs[-1] += "," + item
        else:
            specs.append(item)
    return specs


if __name__ == "__main__":
    main()
