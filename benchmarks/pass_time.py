"""The pass's time per stage for one preset (issue 18's pass-time figure).

    OMP_NUM_THREADS=1 python benchmarks/pass_time.py gru256 [--iters 2] [--repeat 2]

Compiles the preset with hbp_backend(iters, codegen="eager"), runs one backward and prints the
report's timings: Dynamo's trace, each pass of the pipeline, and the pass in all.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import bench_step  # noqa: E402

from hbp_compile import hbp_backend  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("preset", choices=sorted(bench_step.CASES))
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(1)
    case = bench_step.CASES[args.preset]
    for _ in range(args.repeat):
        torch._dynamo.reset()
        torch.manual_seed(0)
        backend = hbp_backend(iters=args.iters, codegen="eager")
        torch.compile(case.make_model(), backend=backend)(*case.make_batch("cpu")).backward()
        times = backend.reports[-1].timings
        print(" ".join(f"{k.removesuffix('_s')}={v:.2f}" for k, v in times.items()))


if __name__ == "__main__":
    main()
