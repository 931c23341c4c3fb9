"""hbp_compile in one screen: compile a tiny GPT with Highway-BP, train a few steps, look inside.

    make demo        (or: python examples/demo.py [--codegen eager] [--iters 2])
"""
import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from models import GPT  # noqa: E402  (the nanoGPT-style test model)

from hbp_compile import hbp_backend  # noqa: E402


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--codegen", default="inductor", choices=["inductor", "eager"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--dump", default=None, help="directory for the graphs and the report")
    args = p.parse_args()

    torch.manual_seed(0)
    model = GPT(vocab=64, block_size=32, n_layer=4, n_head=4, n_embd=64)   # L = 8 residual steps
    exact_model = copy.deepcopy(model)
    backend = hbp_backend(iters=args.iters, codegen=args.codegen, dump_dir=args.dump)
    cmodel = torch.compile(model, backend=backend)

    idx, targets = model.example_inputs(batch_size=8)
    t0 = time.time()
    loss = cmodel(idx, targets)
    loss.backward()
    print(f"compiled + first step in {time.time() - t0:.1f} s\n")
    print(backend.reports[-1], "\n")

    # How close is the Highway-BP gradient to exact backprop on this batch?
    exact_model(idx, targets).backward()
    print(f"gradient cosine vs exact backprop (iters={args.iters}, L=8):")
    for (name, p), q in zip(model.named_parameters(), exact_model.parameters()):
        if name.endswith("c_fc.weight") or name.endswith("wte.weight"):
            print(f"  {name:<36} {cosine(p.grad, q.grad):.4f}")

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(args.steps):
        opt.zero_grad()
        loss = cmodel(idx, targets)
        loss.backward()
        opt.step()
        print(f"step {step}: loss {loss.item():.4f}")
    if args.dump:
        print(f"\ngraphs and report written to {args.dump}/")


if __name__ == "__main__":
    main()
