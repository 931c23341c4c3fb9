"""The measured rule behind scan="auto": sequential vs log-depth diagonal scan, by length.

For each n, both scans are compiled with Inductor (the backward's code path) and timed on
(n, batch, hidden) inputs; the JSON gives the times, the compile times, and the longest n at which
the sequential scan is still faster (what hbp_compile.rewrite.scan.SEQUENTIAL_MAX should hold).

    python benchmarks/bench_scan.py --device cpu [--lengths 4 8 16 ...] [--shape 32 64]
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from hbp_compile.rewrite.scan import reverse_linear_scan, reverse_linear_scan_sequential  # noqa: E402


def timed(fn, *args, reps=30, device="cpu"):
    def sync():
        if device == "cuda":
            torch.cuda.synchronize()
    for _ in range(3):
        fn(*args)
    sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn(*args)
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--lengths", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128, 256, 512])
    ap.add_argument("--shape", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for n in args.lengths:
        a = torch.randn(n, *args.shape, device=args.device)
        k = torch.rand(n - 1, *args.shape, device=args.device)
        row = {"n": n}
        for name, fn in (("sequential", reverse_linear_scan_sequential),
                         ("log_depth", reverse_linear_scan)):
            torch._dynamo.reset()
            compiled = torch.compile(fn, dynamic=False)
            t0 = time.perf_counter()
            compiled(a, k)
            row[f"{name}_compile_s"] = round(time.perf_counter() - t0, 2)
            row[f"{name}_ms"] = 1e3 * timed(compiled, a, k, device=args.device)
        row["sequential_faster"] = row["sequential_ms"] < row["log_depth_ms"]
        print(row, flush=True)
        rows.append(row)
    fastest = [r["n"] for r in rows if r["sequential_faster"]]
    crossover = max((n for n in fastest if all(r["sequential_faster"] for r in rows if r["n"] <= n)),
                    default=0)
    result = {"device": args.device, "shape": args.shape, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "rows": rows,
              "sequential_max": crossover}
    out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                   f"bench_scan_{args.device}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"longest n where sequential wins from n = {args.lengths[0]} on: {crossover} -> {out}")


if __name__ == "__main__":
    main()
