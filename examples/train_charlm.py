"""Time to quality on Shakespeare, character level: exact backprop vs Highway-BP at several k.

    make charlm                                      # the default variants, both models
    python examples/train_charlm.py --full           # the table of examples/README.md
    python examples/train_charlm.py --model gru --variants exact,k2,sched:0=0,0.5=2

Two models: a nanoGPT-style pre-LN GPT (tests/models.py's; 6 layers, L = 12 residual steps) and
an `nn.GRU` char LM (Highway-BP over time: L = T = 128 steps). Every variant starts from the same
weights and sees the same batches; each runs in its own process. One CPU thread.
"""
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
    return ttq.save_result(result, args, preset, model)


def main():
    p = ttq.driver_parser(__doc__, "gpt,gru", DEFAULT_VARIANTS, FULL_VARIANTS,
                          "exact, k<k>, sched:<fraction>=<k>,... (k from that fraction of the "
                          "run), calib[:<every>] (k re-chosen by hbp_compile.calibrated); "
                          "comma-separated")
    p.add_argument("--gamma", type=float, default=0.0, help="the paper's gamma split (hbp variants)")
    args = p.parse_args()
    if args.variant:
        run_one(args)
        return

    def report_one(name, results, out_dir):
        L = "12 residual steps" if name == "gpt" else f"T = {PRESETS['gru']['block_size']} steps"
        ttq.report(results, f"charlm_{name}", out_dir, "val_loss", "val loss",
                   higher_is_better=False, tolerance=0.01, relative=True, fmt="{:.3f}",
                   title=f"char-level Shakespeare, {name} (L = {L})")
    ttq.drive(args, __file__, "charlm", FULL_VARIANTS, report_one, ("--gamma", str(args.gamma)))


if __name__ == "__main__":
    main()
