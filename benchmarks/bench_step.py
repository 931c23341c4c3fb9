"""Time one training step (forward, backward, SGD step): exact Inductor vs Highway-BP.

    python benchmarks/bench_step.py                                        # everything
    python benchmarks/bench_step.py --quick --models mlp --iters 1 --device cpu   # smoke test

Every variant compiles its own deepcopy of one initial model. Steps are timed interleaved (one
step of each variant per round), so clock and thermal drift hit all variants alike.
On a shared CPU set OMP_NUM_THREADS to the idle cores: OpenMP threads contending for a busy
core make a step hundreds of times slower.
"""
import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback

import torch
import torch._inductor.config
import torch.nn as nn
import torch.nn.functional as F

from hbp_compile import hbp_backend

# -----------------------------------------------------------------------------
# models: (a) a deep narrow residual MLP, (b) a small nanoGPT-style pre-LN transformer


class MLPBlock(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear: z = block(x) of one residual step."""

    def __init__(self, d, hidden):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(self.ln(x))))


class ResMLP(nn.Module):
    def __init__(self, d=64, hidden=256, n_blocks=48):
        super().__init__()
        self.blocks = nn.ModuleList(MLPBlock(d, hidden) for _ in range(n_blocks))
        self.head = nn.Linear(d, 1)

    def forward(self, x, y):
        for blk in self.blocks:
            x = x + blk(x)
        return F.mse_loss(self.head(x), y)


class CausalSelfAttention(nn.Module):
    """Explicit matmul + softmax (not SDPA), so the block VJPs can be vmapped into one call."""

    def __init__(self, n_embd, n_head, block_size):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size))
                             .view(1, 1, block_size, block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, T)
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        y = F.softmax(att, dim=-1) @ v                                  # (B, nh, T, hs)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class SDPASelfAttention(nn.Module):
    """Attention as nanoGPT writes it: F.scaled_dot_product_attention(is_causal=True)."""

    def __init__(self, n_embd, n_head, block_size):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)    # (B, nh, T, hs)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, n_embd, n_head, block_size, sdpa=False):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        attn = SDPASelfAttention if sdpa else CausalSelfAttention
        self.attn = attn(n_embd, n_head, block_size)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(),
                                 nn.Linear(4 * n_embd, n_embd))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, vocab=256, block_size=64, n_layer=8, n_head=4, n_embd=128, sdpa=False):
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList(Block(n_embd, n_head, block_size, sdpa) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)

    def forward(self, idx, targets):
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.wte(idx) + self.wpe(pos)                                # (B, T, n_embd)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))                              # (B, T, vocab)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


class GRULoop(nn.Module):
    """nn.GRUCell over T steps, loss at the last step: the paper's Table 6 setting (pixel GRU)."""

    def __init__(self, T, input_size=8, hidden=64, n_classes=10):
        super().__init__()
        self.T = T
        self.cell = nn.GRUCell(input_size, hidden)
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, xs, y):
        h = xs.new_zeros(xs.size(1), self.cell.hidden_size)             # (B, hidden)
        for t in range(self.T):
            h = self.cell(xs[t], h)
        return F.cross_entropy(self.head(h), y)


@dataclasses.dataclass
class Case:
    """A model and the batch it is timed on."""
    desc: str
    make_model: callable
    make_batch: callable


CASES = {
    "mlp": Case("ResMLP 48 blocks, d=64, hidden=256, batch 32 (L=48)", ResMLP,
                lambda dev: (torch.randn(32, 64, device=dev), torch.randn(32, 1, device=dev))),
    "gpt": Case("GPT 8 layers, d=128, 4 heads, vocab 256, batch 8 x 64 (L=16)", GPT,
                lambda dev: (torch.randint(256, (8, 64), device=dev),
                             torch.randint(256, (8, 64), device=dev))),
    "gpt-sdpa": Case("nanoGPT 8 layers, d=128, 4 heads, SDPA, vocab 256, batch 8 x 64 (L=16)",
                     lambda: GPT(sdpa=True),
                     lambda dev: (torch.randint(256, (8, 64), device=dev),
                                  torch.randint(256, (8, 64), device=dev))),
}
for _T in (64, 256, 1024):      # run with --iters 0,3,5,10 --no-unbatched (the paper's Table 6)
    CASES[f"gru{_T}"] = Case(f"GRUCell loop T={_T}, hidden 64, batch 32, loss at the last step",
                             lambda T=_T: GRULoop(T),
                             lambda dev, T=_T: (torch.randn(T, 32, 8, device=dev),
                                                torch.randint(10, (32,), device=dev)))

# -----------------------------------------------------------------------------


def report_summary(backend):
    """What the pass did, per compiled graph: coverage, batching, fallbacks."""
    out = []
    for r in backend.reports:
        out.append(dict(coverage=r.coverage, residual_steps=r.residual_steps,
                        rewritten_blocks=r.rewritten_blocks, fallback_reason=r.fallback_reason,
                        skipped=[f"%{s.node}: {s.reason}" for s in r.skipped],
                        streams=[dict(length=s.length, vjps_per_round=s.vjps_per_round,
                                      groups=[dict(size=g.size, batched=g.batched, reason=g.reason)
                                              for g in s.groups]) for s in r.streams]))
    return out


def bench_model(name, case, args, dev, sync, log, budget):
    torch.manual_seed(0)
    base = case.make_model().to(dev)
    batch = case.make_batch(dev)
    # most telling first, so that a spent budget skips the (slowest to compile) unbatched ones
    variants = [("exact", None)]
    variants += [(f"hbp{k}", dict(iters=k, batched=True)) for k in args.iters]
    if args.unbatched:
        variants += [(f"hbp{k}-unbatched", dict(iters=k, batched=False)) for k in args.iters]

    res, live = {}, []          # live: (name, step_fn) of the variants that compiled
    t_start = time.perf_counter()
    for vname, opts in variants:
        rec = res[vname] = dict(hbp=opts)
        if budget and time.perf_counter() - t_start > budget:
            rec["skipped"] = f"compile budget of {budget:.0f}s for this model spent"
            continue
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        backend = "inductor" if opts is None else hbp_backend(codegen="inductor", **opts)
        cm = torch.compile(model, backend=backend)

        def step(cm=cm, opt=opt):
            loss = cm(*batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        try:
            sync(); t0 = time.perf_counter()
            step()                                          # compiles forward and backward
            sync(); rec["compile_s"] = time.perf_counter() - t0
            for _ in range(args.warmup):
                step()
        except Exception as e:                              # noqa: BLE001 - recorded, run goes on
            rec["error"] = f"{type(e).__name__}: {e}"
            rec["traceback"] = traceback.format_exc()
            log(f"  {name}/{vname}: FAILED {rec['error']}")
            continue
        if opts is not None:
            rec["reports"] = report_summary(backend)
            rec["coverage"] = [r["coverage"] for r in rec["reports"]]
            rec["groups_batched"] = [g["batched"] for r in rec["reports"]
                                     for s in r["streams"] for g in s["groups"]]
            rec["fallback_reason"] = [r["fallback_reason"] for r in rec["reports"]
                                      if r["fallback_reason"]]
            if not backend.reports:
                rec["warning"] = "the hbp backend was never called (Dynamo reused another entry?)"
        log(f"  {name}/{vname}: compiled in {rec['compile_s']:.1f}s")
        live.append((vname, step))

    times = {v: [] for v, _ in live}
    for _ in range(args.steps):                             # interleaved: one step per variant
        for vname, step in live:
            sync(); t0 = time.perf_counter()
            step()
            sync(); times[vname].append(1e3 * (time.perf_counter() - t0))

    exact = statistics.median(times["exact"]) if times.get("exact") else None
    for vname, ts in times.items():
        q = statistics.quantiles(ts, n=10) if len(ts) > 1 else ts * 9
        med = statistics.median(ts)
        res[vname].update(median_ms=med, p10_ms=q[0], p90_ms=q[-1], times_ms=ts,
                          ratio_vs_exact=med / exact if exact else None)
    return dict(desc=case.desc, params=sum(p.numel() for p in base.parameters()),
                variants=res)


def print_table(results):
    print(f"\n{'model':<5} {'variant':<16} {'median ms':>10} {'p10':>8} {'p90':>8} "
          f"{'ratio':>6} {'compile s':>9}  batched  coverage")
    for mname, m in results["models"].items():
        for vname, r in m["variants"].items():
            if "median_ms" not in r:
                print(f"{mname:<5} {vname:<16} {r.get('skipped') or r.get('error', '?')}")
                continue
            b = r.get("groups_batched")
            cov = r.get("coverage")
            print(f"{mname:<5} {vname:<16} {r['median_ms']:>10.2f} {r['p10_ms']:>8.2f} "
                  f"{r['p90_ms']:>8.2f} {r['ratio_vs_exact'] or float('nan'):>6.2f} "
                  f"{r['compile_s']:>9.1f}  {'-' if b is None else ''.join('yn'[not x] for x in b) or 'none':<7}  "
                  f"{'-' if cov is None else ','.join(f'{c:.0%}' for c in cov)}"
                  + ("  FALLBACK" if r.get("fallback_reason") else ""))


def plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    models = results["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.5), squeeze=False)
    for ax, (mname, m) in zip(axes[0], models.items()):
        vs = {v: r["ratio_vs_exact"] for v, r in m["variants"].items() if r.get("ratio_vs_exact")}
        ax.bar(list(vs), list(vs.values()))
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_title(mname), ax.set_ylabel("step time / exact")
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path)


def main():
    # Inductor's scheduler walks dependency chains recursively: a 1024-step RNN's forward alone
    # is deeper than Python's default limit (RecursionError in memory.topological_sort_dfs)
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 100_000))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"],
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--models", default="mlp,gpt")
    p.add_argument("--iters", default="1,2,3")
    p.add_argument("--quick", action="store_true", help="5 timed steps, 1 warmup (smoke test)")
    p.add_argument("--no-unbatched", dest="unbatched", action="store_false",
                   help="skip the batched=False variants (long RNNs: one VJP per step)")
    p.add_argument("--budget", type=float, default=0,
                   help="seconds of compiling for the whole run, shared among the models; "
                        "a model compiles no further variants once its share is spent (0: none)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    args.iters = [int(k) for k in args.iters.split(",")]
    args.steps, args.warmup = (5, 1) if args.quick else (args.steps, 3)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"bench_step_{args.device}.json")

    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True      # as nanoGPT's bench.py
        torch.backends.cudnn.allow_tf32 = True
    # every variant adds a cache entry to the same forward code object; keep them all
    for knob in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)

    results = dict(torch=torch.__version__, python=platform.python_version(),
                   device=args.device, threads=torch.get_num_threads(),
                   device_name=torch.cuda.get_device_name() if dev.type == "cuda"
                   else (platform.processor() or platform.machine()),
                   steps=args.steps, warmup=args.warmup, optimizer="SGD(lr=1e-3)",
                   fx_graph_cache=torch._inductor.config.fx_graph_cache,  # warm: compile_s lower
                   argv=sys.argv[1:], models={})
    t0 = time.perf_counter()
    names = args.models.split(",")
    for i, name in enumerate(names):
        print(f"{name}: {CASES[name].desc}", flush=True)
        share = args.budget and max(args.budget - (time.perf_counter() - t0), 1) / (len(names) - i)
        results["models"][name] = bench_model(name, CASES[name], args, dev, sync,
                                              lambda s: print(s, flush=True), share)
        results["wall_s"] = time.perf_counter() - t0
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:                           # after every model: partial results
            json.dump(results, f, indent=1, default=str)
    print_table(results)
    print(f"\n{results['device_name']}, torch {torch.__version__}, {results['threads']} threads, "
          f"{args.steps} steps; wall {results['wall_s']:.0f}s; wrote {out}")
    plot(results, os.path.splitext(out)[0] + ".png")


if __name__ == "__main__":
    main()
