"""DDP step time, exact vs Highway-BP, and how much of the all-reduce each leaves exposed.

    OMP_NUM_THREADS=1 python benchmarks/bench_ddp.py [--model mlp] [--iters 1,2] [--steps 30]

2 gloo processes on this CPU (one thread each), `DDP(torch.compile(model, backend=...))`, under
three of Dynamo's DDP settings: DDPOptimizer's split (the default: one graph per gradient
bucket, so a bucket is all-reduced while the graphs before it still run their backward),
optimize_ddp=False (one graph: every gradient comes out at the end of the one backward, and
the all-reduce runs after it) and "python_reducer" under compiled autograd (DDP's reducer traced
into the compiled backward). Each variant also runs under `ddp.no_sync()` (the same step,
no all-reduce): step minus no-sync step is the communication the backward did not hide.
Variants interleaved (one step each per round, order rotating), warm-up excluded, median and IQR
over --steps rounds, timed on rank 0 between barriers. JSON, a plot and a markdown table go to
--out (default benchmarks/results/ddp_<model>.{json,png,md}).
"""
import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.elastic.utils.distributed import get_free_port

sys.path.insert(0, os.path.dirname(__file__))
import bench_step  # noqa: E402

# torch._dynamo.config.optimize_ddp per setting; "python_reducer" runs under compiled autograd,
# which traces DDP's reducer (its all-reduces) into one graph with the backward
MODES = {"ddp_optimizer": True, "one_graph": False, "python_reducer": "python_reducer"}


def make_variant(case, k):
    """(DDP module, optimizer, hbp backend or None) of one variant; compiled on its first step
    with Dynamo's DDP setting for `mode` (a compiled graph keeps the split it was built with)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from hbp_compile import hbp_backend

    torch.manual_seed(0)
    model = case.make_model()
    backend = hbp_backend(iters=k) if k is not None else None
    ddp = DDP(torch.compile(model, backend=backend or _inductor()))
    return ddp, torch.optim.SGD(model.parameters(), lr=1e-3), backend


def _inductor():
    """Inductor as a backend of its own: Dynamo would otherwise reuse another exact variant's
    compiled frame (same code, same backend), split or not whatever this variant's setting."""
    from torch._inductor.compile_fx import compile_fx

    def inductor(gm, example_inputs):
        return compile_fx(gm, example_inputs)
    return inductor


def step_fn(ddp, opt, batch, mode):
    def step(sync=True):
        with torch._dynamo.config.patch(optimize_ddp=MODES[mode],
                                        compiled_autograd=mode == "python_reducer"):
            with contextlib.nullcontext() if sync else ddp.no_sync():
                ddp(*batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def timed(step, sync: bool) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    step(sync)
    dist.barrier()
    return 1e3 * (time.perf_counter() - t0)


def rank_main(rank, args, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    torch._dynamo.config.recompile_limit = 64   # every variant is a cache entry of one frame
    case = bench_step.CASES[args.model]
    torch.manual_seed(100 + rank)
    batch = case.make_batch("cpu")
    variants, info = {}, {}
    for mode in MODES:
        for k in [None, *args.iters]:
            name = f"{mode}/{'exact' if k is None else f'hbp{k}'}"
            ddp, opt, backend = make_variant(case, k)
            step = step_fn(ddp, opt, batch, mode)
            t0 = time.perf_counter()
            step()                                        # compiles
            info[name] = {"compile_s": time.perf_counter() - t0}
            if backend is not None:
                info[name]["summary"] = backend.summary()
                info[name]["reports"] = [str(r).splitlines()[:2] for r in backend.reports]
            for _ in range(args.warmup):
                step()
                step(False)
            variants[name] = step
    names = list(variants)
    times = {n: {"sync": [], "no_sync": []} for n in names}
    for r in range(args.steps):
        for n in names[r % len(names):] + names[:r % len(names)]:
            times[n]["sync"].append(timed(variants[n], True))
            times[n]["no_sync"].append(timed(variants[n], False))
    if rank == 0:
        write(args, case, info, times)
    dist.barrier()
    dist.destroy_process_group()


def stats(ts) -> dict:
    q = statistics.quantiles(ts, n=4)
    return {"median_ms": statistics.median(ts), "iqr_ms": q[2] - q[0]}


def write(args, case, info, times):
    rows = {}
    for n, t in times.items():
        exact = statistics.median(times[n.split("/")[0] + "/exact"]["sync"])
        s, ns = stats(t["sync"]), stats(t["no_sync"])
        rows[n] = dict(info[n], step=s, no_sync=ns, times_ms=t,
                       exposed_comm_ms=s["median_ms"] - ns["median_ms"],
                       ratio_vs_exact=s["median_ms"] / exact)
    out = {"machine": platform.platform(), "cpu": platform.processor(),
           "torch": torch.__version__, "world_size": 2, "backend": "gloo", "threads": 1,
           "model": args.model, "desc": case.desc, "steps": args.steps, "rows": rows}
    base = os.path.join(args.out, f"ddp_{args.model}")
    os.makedirs(args.out, exist_ok=True)
    with open(base + ".json", "w") as f:
        json.dump(out, f, indent=1)
    lines = [f"DDP, 2 gloo processes x 1 thread, {case.desc}, {args.steps} interleaved steps",
             "", "| setting | variant | step ms (IQR) | vs exact | no-sync ms | exposed comm ms "
             "| compile s | coverage |", "|---|---|---|---|---|---|---|---|"]
    for n, r in rows.items():
        mode, v = n.split("/")
        lines.append(f"| {mode} | {v} | {r['step']['median_ms']:.1f} ({r['step']['iqr_ms']:.1f}) "
                     f"| {r['ratio_vs_exact']:.2f}x | {r['no_sync']['median_ms']:.1f} | "
                     f"{r['exposed_comm_ms']:.1f} | {r['compile_s']:.0f} | "
                     f"{r.get('summary', '-').split(': ', 1)[-1]} |")
    text = "\n".join(lines)
    print(text)
    with open(base + ".md", "w") as f:
        f.write(text + "\n")
    plot(rows, base + ".png", case.desc)


def plot(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(rows)
    comp = [rows[n]["no_sync"]["median_ms"] for n in names]
    comm = [max(rows[n]["exposed_comm_ms"], 0.0) for n in names]
    ax.barh(names, comp, label="step without all-reduce (no_sync)", color="C0")
    ax.barh(names, comm, left=comp, label="exposed all-reduce", color="C3")
    ax.set(xlabel="ms per step (median, rank 0)", title=title[:90])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mlp", choices=sorted(bench_step.CASES))
    p.add_argument("--iters", default="1,2")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args()
    args.iters = [int(k) for k in args.iters.split(",") if k]
    mp.spawn(rank_main, args=(args, get_free_port()), nprocs=2)


if __name__ == "__main__":
    main()
