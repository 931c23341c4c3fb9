"""Where a training step's time goes: torch.profiler over whole steps, per variant, with
Inductor's generated kernels timed one by one.

    OMP_NUM_THREADS=1 python benchmarks/profile_step.py --model gpt-sdpa --iters 1

Each variant (exact Inductor, Highway-BP batched and unbatched at k) compiles its own copy of
one model (bench_step's presets), runs 3 warm-up steps, then N profiled steps; the table lists
per variant the ops and kernels with the most self CPU time per step, and the minor page
faults per step. Times here are for finding where the time goes, not for ratios: bench_step
interleaves the variants for those.
"""
import argparse
import copy

import torch
import torch._inductor.config as inductor_config
from torch.profiler import ProfilerActivity, profile

from bench_step import CASES, _minor_faults
from hbp_compile import hbp_backend


def variants(k: int):
    """(name, torch.compile backend) per variant."""
    return [("exact", "inductor"),
            (f"hbp{k}", hbp_backend(iters=k, batched=True, codegen="inductor")),
            (f"hbp{k}-unbatched", hbp_backend(iters=k, batched=False, codegen="inductor"))]


def profile_variant(case, backend, steps: int, top: int):
    """(rows of (name, self ms per step, calls per step), minor faults per step)."""
    torch.manual_seed(0)
    model = case.make_model()
    batch = case.make_batch(torch.device("cpu"))
    cm = torch.compile(copy.deepcopy(model), backend=backend)
    opt = torch.optim.SGD(cm.parameters(), lr=1e-3)

    def step():
        cm(*batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(4):                          # the first compiles
        step()
    faults = _minor_faults()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    faults = (_minor_faults() - faults) / steps
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    return [(e.key, e.self_cpu_time_total / 1e3 / steps, e.count / steps) for e in rows], faults


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt-sdpa", choices=sorted(CASES))
    p.add_argument("--iters", type=int, default=1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args()
    torch.set_num_threads(1)
    inductor_config.cpp.enable_kernel_profile = True     # one profiler event per kernel
    print(f"{args.model}: {CASES[args.model].desc}; {args.steps} profiled steps")
    for name, backend in variants(args.iters):
        rows, faults = profile_variant(CASES[args.model], backend, args.steps, args.top)
        print(f"\n{name}: {faults:.0f} minor page faults per step")
        print(f"  {'self ms/step':>12} {'calls/step':>10}  op or kernel")
        for key, ms, calls in rows:
            print(f"  {ms:12.2f} {calls:10.1f}  {key[:90]}")
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
