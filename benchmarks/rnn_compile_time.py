"""Compile time of nn.GRU / nn.LSTM models under hbp against the sequence length T.

The module path must not unroll time: compiling at T=1024 should cost what it costs at T=64.
One process, caches off (every compile is a real one), after a warm-up compile that absorbs
Inductor's one-time start-up. The compile time of a variant is its first step minus the median
of its next steps; the report's stage timings (Dynamo trace, the pass, forward and backward
compile) come with it.

    OMP_NUM_THREADS=1 python benchmarks/rnn_compile_time.py --out results/rnn_compile_time_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_step import RNNModule, _option  # noqa: E402

from hbp_compile import hbp_backend  # noqa: E402


def first_step_and_steady(model, batch, steps=3):
    """Seconds of the first training step (compiles) and the median of the next ones."""
    def step():
        t0 = time.perf_counter()
        model(*batch).backward()
        return time.perf_counter() - t0
    first = step()
    return first, statistics.median(step() for _ in range(steps))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="64,1024")
    p.add_argument("--kinds", default="GRU,LSTM")
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--hbp-option", action="append", default=[], metavar="NAME=VALUE",
                   help="an hbp_backend option (a Python literal or a string), e.g. "
                        "rnn_time_chunks=1; repeatable")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                 "results", "rnn_compile_time_cpu.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    for knob in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)

    warm = RNNModule("GRU", 8, hidden=8)             # Inductor's start-up, paid once here
    first_step_and_steady(torch.compile(warm, backend=hbp_backend(iters=1), dynamic=False),
                          (torch.randn(8, 2, 3), torch.randint(10, (8, 2))), steps=1)

    results = dict(torch=torch.__version__, machine=platform.machine(), threads=args.threads,
                   iters=args.iters, hidden=args.hidden, batch=args.batch, runs=[],
                   hbp_options=dict(_option(o) for o in args.hbp_option))
    for kind in args.kinds.split(","):
        for T in map(int, args.lengths.split(",")):
            torch.manual_seed(0)
            torch._dynamo.reset()           # no automatic-dynamic recompile from the last size
            backend = hbp_backend(iters=args.iters, **results["hbp_options"])
            model = torch.compile(RNNModule(kind, T, hidden=args.hidden), backend=backend,
                                  dynamic=False)
            batch = (torch.randn(T, args.batch, 3), torch.randint(10, (T, args.batch)))
            first, steady = first_step_and_steady(model, batch)
            (report,) = backend.reports
            assert [s.length for s in report.streams] == [T], str(report)
            run = dict(kind=kind, T=T, compile_s=first - steady, step_s=steady,
                       stages=report.timings, streams=[s.length for s in report.streams])
            results["runs"].append(run)
            print(f"nn.{kind} T={T}: compile {run['compile_s']:.2f}s (step {steady * 1e3:.0f} ms)"
                  f" stages " + ", ".join(f"{k} {v:.2f}" for k, v in report.timings.items()),
                  flush=True)
    for kind in args.kinds.split(","):
        runs = [r for r in results["runs"] if r["kind"] == kind]
        results[f"{kind}_ratio_longest_to_shortest"] = runs[-1]["compile_s"] / runs[0]["compile_s"]
        print(f"nn.{kind}: compile at T={runs[-1]['T']} / T={runs[0]['T']} = "
              f"{results[f'{kind}_ratio_longest_to_shortest']:.2f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
