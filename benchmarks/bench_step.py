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


class RNNModule(nn.Module):
    """nn.GRU / nn.LSTM over T steps and a classifier on every step's output (loss at every
    step); what a user writes, the module's own ATen op underneath."""

    def __init__(self, kind, T, input_size=3, hidden=64, layers=1, n_classes=10):
        super().__init__()
        self.rnn = getattr(nn, kind)(input_size, hidden, num_layers=layers)
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, xs, ys):                                  # (T, B, input), (T, B)
        out, _ = self.rnn(xs)
        return F.cross_entropy(self.head(out).flatten(0, 1), ys.flatten())


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN; with stride 2 the shortcut is a 1x1 conv + BN projection."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.short = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        z = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
        return F.relu((x if self.short is None else self.short(x)) + z)


class ResNetCIFAR(nn.Module):
    """ResNet-(6n+2) for 32x32 images (He et al. 2016): n=9 is ResNet-56 (L=27 residual steps,
    two of them projections)."""

    def __init__(self, n=9, widths=(16, 32, 64), n_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(n):
                blocks.append(BasicBlock(cin, w, 2 if i > 0 and j == 0 else 1))
                cin = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, n_classes)

    def forward(self, x, y):
        h = self.blocks(self.stem(x)).mean((2, 3))
        return F.cross_entropy(self.head(h), y)


@dataclasses.dataclass
class Case:
    """A model and the batch it is timed on."""
    desc: str
    make_model: callable
    make_batch: callable
    # exact = the uncompiled module: what torch.compile gives a model with an nn.RNN module
    # (Dynamo cannot trace it and runs the frame eagerly), and compiling it here would make
    # Dynamo skip the frame for the hbp variants too
    exact_eager: bool = False


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
CASES["gpt12"] = Case("GPT 12 layers, d=256, 8 heads, SDPA, vocab 256, batch 8 x 128 (L=24; "
                      "the paper's GPT-2-style setting, scaled down)",
                      lambda: GPT(block_size=128, n_layer=12, n_head=8, n_embd=256, sdpa=True),
                      lambda dev: (torch.randint(256, (8, 128), device=dev),
                                   torch.randint(256, (8, 128), device=dev)))
CASES["resnet56"] = Case("ResNet-56 (CIFAR, BN train mode), batch 32 x 3 x 32 x 32 (L=27)",
                         ResNetCIFAR,
                         lambda dev: (torch.randn(32, 3, 32, 32, device=dev),
                                      torch.randint(10, (32,), device=dev)))
for _T in (64, 256, 1024):      # run with --iters 0,3,5,10 --no-unbatched (the paper's Table 6)
    CASES[f"gru{_T}"] = Case(f"GRUCell loop T={_T}, hidden 64, batch 32, loss at the last step",
                             lambda T=_T: GRULoop(T),
                             lambda dev, T=_T: (torch.randn(T, 32, 8, device=dev),
                                                torch.randint(10, (32,), device=dev)))


def _rnn_case(kind, T, hidden, batch, input_size, layers=1, note=""):
    return Case(f"nn.{kind} T={T}, hidden {hidden}, {layers} layer(s), batch {batch}, input "
                f"{input_size}, loss at every step{note}; exact = the module's own op",
                lambda: RNNModule(kind, T, input_size, hidden, layers),
                lambda dev: (torch.randn(T, batch, input_size, device=dev),
                             torch.randint(10, (T, batch), device=dev)),
                exact_eager=True)


# run with --iters 0,1,2,5,10 --no-unbatched --no-nofold (the paper's Table 6 rows)
CASES["nn-gru1024"] = _rnn_case("GRU", 1024, 64, 32, 3, note=" (pixel CIFAR-10 shape)")
CASES["nn-lstm1024"] = _rnn_case("LSTM", 1024, 64, 32, 3, note=" (pixel CIFAR-10 shape)")
_GPU = torch.cuda.is_available()
for _kind in ("GRU", "LSTM"):        # the paper: hidden 512, batch 128 on a GPU; CPU scaled down
    CASES[f"nn-{_kind.lower()}256"] = _rnn_case(
        _kind, 256, 512 if _GPU else 128, 128 if _GPU else 32, 32,
        note="" if _GPU else " (CPU: hidden 512 -> 128, batch 128 -> 32)")
CASES["nn-gru256x3"] = _rnn_case("GRU", 256, 512 if _GPU else 128, 128 if _GPU else 32, 32,
                                 layers=3)

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


MATMUL_FLOPS = {
    "aten.mm.default": lambda a, o: 2 * a[0].shape[0] * a[0].shape[1] * a[1].shape[1],
    "aten.addmm.default": lambda a, o: 2 * a[1].shape[0] * a[1].shape[1] * a[2].shape[1],
    "aten.bmm.default": lambda a, o: 2 * a[0].shape[0] * a[0].shape[1] * a[0].shape[2]
    * a[1].shape[2],
    "aten.convolution.default": lambda a, o: 2 * o.numel() * a[1].shape[1]
    * math.prod(a[1].shape[2:]),
}
# SDPA's two (forward) or five (backward) T x T x head_dim matmuls, causal or not
for _name, _mult in [("_scaled_dot_product_flash_attention_for_cpu", 2),
                     ("_scaled_dot_product_flash_attention_for_cpu_backward", 5),
                     ("_scaled_dot_product_efficient_attention", 2),
                     ("_scaled_dot_product_efficient_attention_backward", 5),
                     ("_scaled_dot_product_flash_attention", 2),
                     ("_scaled_dot_product_flash_attention_backward", 5),
                     ("_scaled_dot_product_cudnn_attention", 2),
                     ("_scaled_dot_product_cudnn_attention_backward", 5)]:
    MATMUL_FLOPS[f"aten.{_name}.default"] = (
        lambda a, o, m=_mult, bw=_name.endswith("backward"):
        2 * m * math.prod(a[1 if bw else 0].shape[:-1]) * a[2 if bw else 1].shape[-2]
        * a[1 if bw else 0].shape[-1])


def node_matmul_flops(n) -> int:
    """Matmul FLOPs of one aten node, from the shapes in its meta (0 for other ops)."""
    fn = MATMUL_FLOPS.get(str(n.target))
    if fn is None:
        return 0
    args = [a.meta.get("val") if hasattr(a, "meta") else a for a in n.args]
    val = n.meta.get("val")
    try:
        return int(fn(args, val[0] if isinstance(val, (tuple, list)) else val))
    except Exception:                                       # noqa: BLE001 - symbolic shapes
        return 0


def matmul_flops(gm) -> int:
    """Matmul FLOPs of one run of an aten graph."""
    return sum(node_matmul_flops(n) for n in gm.graph.nodes)


class RecordingInductor:
    """backend="inductor", recording the forward and backward graphs handed to Inductor."""

    def __init__(self):
        self.graphs, self.timings = {}, {}

    def __call__(self, gm, example_inputs):
        from hbp_compile.backend import _dynamo_trace_seconds
        from hbp_compile.codegen import compile_inductor
        self.timings["dynamo_trace_s"] = _dynamo_trace_seconds()

        def on_graph(name, g, seconds=None):
            if seconds is not None:
                self.timings[f"{name}_compile_s"] = seconds
            else:
                self.graphs[name] = g
        # an AOTAutograd cache hit would skip the compilers that record the graphs
        with torch._functorch.config.patch(enable_autograd_cache=False):
            return compile_inductor(gm, example_inputs, on_graph, "exact")


def graph_flops(graphs) -> dict:
    return {k: matmul_flops(graphs[k]) for k in ("forward", "backward") if k in graphs}


def kernel_count(code: str) -> int:
    """Kernel launches in one run of an Inductor module: generated kernels (cpp_fused_*,
    Triton .run), extern kernels (matmuls, SDPA) and aten fallbacks, in its call()."""
    body = code.split("def call(", 1)[-1].split("\ndef ", 1)[0]
    calls = 0
    for line in body.splitlines():
        line = line.strip()
        if line.startswith("#"):
            continue
        calls += (line.startswith("cpp_fused_") or ".run(" in line or "extern_kernels." in line
                  or "torch.ops.aten." in line or line.startswith("aten."))
    return calls


def graph_kernels(graphs) -> dict:
    return {k: kernel_count(graphs[f"{k}_code"]) for k in ("forward", "backward")
            if isinstance(graphs.get(f"{k}_code"), str)}


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def peak_step_memory_mb(step, dev) -> float:
    """Peak memory of two steps above what was resident before them.

    CUDA: max_memory_allocated. CPU: the process's peak RSS (VmHWM, reset through
    /proc/self/clear_refs after malloc_trim) minus its RSS before the steps."""
    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return float("nan")
    base = _rss_kb("VmRSS:")
    for _ in range(2):
        step()
    return (_rss_kb("VmHWM:") - base) / 1024


def _cache_counters() -> dict:
    """Inductor FX-graph and AOTAutograd cache hits, misses and bypasses so far."""
    from torch._dynamo.utils import counters
    return {f"{group}.{k}": v for group in ("inductor", "aot_autograd")
            for k, v in counters[group].items() if "cache" in k}


def _minor_faults() -> int:
    """This process's minor page faults so far: memory the allocator gave back to the kernel
    and touched again (a freshly faulted page costs ~5 us on the project's VM)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _flat_grads(model):
    return torch.cat([p.grad.detach().flatten().double() for p in model.parameters()
                      if p.grad is not None])


def _option(text: str) -> tuple:
    """'name=value' -> (name, value): a Python literal, else the string."""
    import ast
    name, _, value = text.partition("=")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name, value


def variant_list(args):
    variants = [("exact", None)]
    if args.eager:
        variants.append(("eager", None))
    variants += [(f"hbp{k}", dict(iters=k, batched=True, **args.hbp_options))
                 for k in args.iters]
    if args.unbatched:
        variants += [(f"hbp{k}-unbatched", dict(iters=k, batched=False)) for k in args.iters]
    if args.nofold:
        variants += [(f"hbp{k}-nofold", dict(iters=k, batched=False, fold=False))
                     for k in args.iters[:1]]
    return variants


def bench_model(name, case, args, dev, sync, log, budget):
    torch.manual_seed(0)
    base = case.make_model().to(dev)
    batch = case.make_batch(dev)
    # most telling first, so that a spent budget skips the (slowest to compile) later ones
    res, live = {}, []          # live: (name, step_fn) of the variants that compiled
    grads = {}
    t_start = time.perf_counter()
    for vname, opts in variant_list(args):
        rec = res[vname] = dict(hbp=opts)
        if budget and time.perf_counter() - t_start > budget:
            rec["skipped"] = f"compile budget of {budget:.0f}s for this model spent"
            continue
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        if vname == "eager" and case.exact_eager:
            rec["skipped"] = "exact already runs the module eagerly"
            continue
        if vname == "eager" or (vname == "exact" and case.exact_eager):
            cm, backend = model, None
        else:
            backend = RecordingInductor() if opts is None else hbp_backend(codegen="inductor", **opts)
            cm = torch.compile(model, backend=backend)

        def step(cm=cm, opt=opt, model=model, keep=False):
            loss = cm(*batch)
            loss.backward()
            if keep:
                grads[vname] = _flat_grads(model)
            opt.step()
            opt.zero_grad(set_to_none=True)

        try:
            before = _cache_counters()
            sync(); t0 = time.perf_counter()
            step(keep=True)                                 # compiles forward and backward
            sync(); rec["compile_s"] = time.perf_counter() - t0
            rec["caches"] = {k: v - before.get(k, 0) for k, v in _cache_counters().items()
                             if v - before.get(k, 0)}
            for _ in range(args.warmup):
                step()
        except Exception as e:                              # noqa: BLE001 - recorded, run goes on
            rec["error"] = f"{type(e).__name__}: {e}"
            rec["traceback"] = traceback.format_exc()
            log(f"  {name}/{vname}: FAILED {rec['error']}")
            continue
        record_compile(rec, backend)
        if "exact" in grads and vname in grads:
            a, b = grads["exact"], grads[vname]
            rec["grad_cosine"] = float(a @ b / (a.norm() * b.norm()))
        log(f"  {name}/{vname}: compiled in {rec['compile_s']:.1f}s")
        live.append((vname, step))

    times, faults = time_interleaved(live, args.steps, sync)
    if args.memory:
        for vname, step in live:
            res[vname]["peak_step_mb"] = peak_step_memory_mb(step, dev)
    if args.projection:                 # compiles once more: counted in the compile budget
        for vname, _ in live:
            if budget and time.perf_counter() - t_start > budget:
                res[vname]["projection"] = dict(skipped="compile budget spent")
            elif vname != "eager" and not (vname == "exact" and case.exact_eager):
                res[vname]["projection"] = projected_step(base, batch, res[vname]["hbp"])

    summarize(res, times, faults)
    return dict(desc=case.desc, params=sum(p.numel() for p in base.parameters()),
                variants=res)


def record_compile(rec: dict, backend) -> None:
    """What a variant's compile left to read: its graphs' matmul FLOPs and kernels, the
    compile stages' times, and for Highway-BP what the pass did."""
    if isinstance(backend, RecordingInductor):
        rec["timings"] = backend.timings
        rec["matmul_flops"] = graph_flops(backend.graphs)
        rec["kernels"] = graph_kernels(backend.graphs)
    elif backend is not None:
        rec["reports"] = report_summary(backend)
        rec["coverage"] = [r["coverage"] for r in rec["reports"]]
        rec["groups_batched"] = [g["batched"] for r in rec["reports"]
                                 for s in r["streams"] for g in s["groups"]]
        rec["fallback_reason"] = [r["fallback_reason"] for r in rec["reports"]
                                  if r["fallback_reason"]]
        if backend.reports:
            rec["timings"] = backend.reports[-1].timings
            rec["matmul_flops"] = graph_flops(backend.reports[-1].graphs)
            rec["kernels"] = graph_kernels(backend.reports[-1].graphs)
        else:
            rec["warning"] = "the hbp backend was never called (Dynamo reused another entry?)"


def time_interleaved(live, steps: int, sync) -> tuple[dict, dict]:
    """Per variant, ms and minor page faults of each of `steps` rounds, one step of every
    variant per round, the order rotating from round to round (drift hits all alike)."""
    times = {v: [] for v, _ in live}
    faults = {v: [] for v, _ in live}           # minor page faults per step (the allocator)
    for r in range(steps):
        for vname, step in live[r % len(live):] + live[:r % len(live)]:
            f0 = _minor_faults()
            sync(); t0 = time.perf_counter()
            step()
            sync(); times[vname].append(1e3 * (time.perf_counter() - t0))
            faults[vname].append(_minor_faults() - f0)
    return times, faults


def summarize(res: dict, times: dict, faults: dict) -> None:
    """Median, quartiles and ratio to exact of each variant's step times, into res."""
    exact = statistics.median(times["exact"]) if times.get("exact") else None
    for vname, ts in times.items():
        if not ts:                                  # --compile-only
            continue
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else ts * 3
        med = statistics.median(ts)
        res[vname].update(median_ms=med, p25_ms=q[0], p75_ms=q[-1], iqr_ms=q[-1] - q[0],
                          times_ms=ts, ratio_vs_exact=med / exact if exact else None,
                          minor_faults=faults[vname],
                          median_minor_faults=statistics.median(faults[vname]))


def projected_step(base, batch, opts) -> dict:
    """gpu_projection's figures for one variant (opts None: exact Inductor): its own copy of
    the model compiled once more with Inductor's caches off, so that its kernels are
    scheduled and counted, one step run; Dynamo's entries for it are dropped after."""
    from gpu_projection import project, recording_kernels
    model = copy.deepcopy(base)
    backend = "inductor" if opts is None else hbp_backend(codegen="inductor", **opts)
    try:
        with recording_kernels(node_matmul_flops) as graphs:
            torch.compile(model, backend=backend)(*batch).backward()
    except Exception as e:                                  # noqa: BLE001 - recorded
        return dict(error=f"{type(e).__name__}: {e}")
    finally:
        torch._dynamo.eval_frame.remove_from_cache(type(model).forward)
    return project(graphs)


def _floor(r, exact):
    """Matmul FLOPs of a variant's step (forward + backward graphs) over exact Inductor's."""
    f, e = r.get("matmul_flops"), exact.get("matmul_flops")
    if not f or not e or not sum(e.values()):
        return None
    return sum(f.values()) / sum(e.values())


def print_table(results):
    head = (f"{'model':<9} {'variant':<16} {'median ms':>9} {'IQR':>6} {'ratio':>6} {'floor':>6} "
            f"{'compile s':>9} {'warm s':>6} {'peak MB':>8} {'cos':>7} {'faults':>7} {'H100 ms':>7} "
            f"{'graphs':>6}  batched  coverage")
    print("\n" + head)
    for mname, m in results["models"].items():
        exact = m["variants"].get("exact", {})
        for vname, r in m["variants"].items():
            if "median_ms" not in r:
                print(f"{mname:<9} {vname:<16} {r.get('skipped') or r.get('error', '?')}")
                continue
            b, cov, fl = r.get("groups_batched"), r.get("coverage"), _floor(r, exact)
            warm = r.get("compile_warm_s")
            print(f"{mname:<9} {vname:<16} {r['median_ms']:>9.2f} {r['iqr_ms']:>6.2f} "
                  f"{r['ratio_vs_exact'] or float('nan'):>6.2f} "
                  f"{'-' if fl is None else f'{fl:.2f}':>6} {r['compile_s']:>9.1f} "
                  f"{'-' if warm is None else f'{warm:.1f}':>6} "
                  f"{r.get('peak_step_mb', float('nan')):>8.1f} "
                  f"{r.get('grad_cosine', float('nan')):>7.4f} "
                  f"{r.get('median_minor_faults', float('nan')):>7.0f} "
                  f"{(r.get('projection') or {}).get('h100_ms', float('nan')):>7.2f} "
                  f"{(r.get('projection') or {}).get('h100_graphs_ms', float('nan')):>6.2f}  "
                  f"{'-' if b is None else ''.join('yn'[not x] for x in b) or 'none':<7}  "
                  f"{'-' if cov is None else ','.join(f'{c:.0%}' for c in cov)}"
                  + ("  FALLBACK" if r.get("fallback_reason") else ""))


def plot(results, path):
    """Step time / exact Inductor vs k per preset: batched and unbatched as lines with IQR
    bars, exact Inductor (1.0) and eager exact as horizontal lines."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    models = results["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 3.5), squeeze=False)
    for ax, (mname, m) in zip(axes[0], models.items()):
        vs = m["variants"]
        ex = vs.get("exact", {}).get("median_ms")
        if not ex:
            continue
        for suffix, label in (("", "Highway-BP batched"), ("-unbatched", "unbatched")):
            pts = sorted((int(v[3:].split("-")[0]), r) for v, r in vs.items()
                         if v.startswith("hbp") and v[3:].split("-")[0].isdigit()
                         and v == f"hbp{v[3:].split('-')[0]}{suffix}" and r.get("median_ms"))
            if pts:
                ks = [k for k, _ in pts]
                ax.errorbar(ks, [r["median_ms"] / ex for _, r in pts],
                            yerr=[[(r["median_ms"] - r["p25_ms"]) / ex for _, r in pts],
                                  [(r["p75_ms"] - r["median_ms"]) / ex for _, r in pts]],
                            marker="o", capsize=3, label=label)
        ax.axhline(1.0, color="k", lw=0.8, label="exact (Inductor)")
        if vs.get("eager", {}).get("median_ms"):
            ax.axhline(vs["eager"]["median_ms"] / ex, color="gray", ls="--", lw=0.8,
                       label="exact (eager)")
        ax.set_title(mname), ax.set_xlabel("k (iters)"), ax.set_ylabel("step time / exact")
        ax.legend(fontsize=7)
    fig.suptitle(f"{results['device_name']}, torch {results['torch']}, "
                 f"{results['threads']} thread(s)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def warm_compile(args, out):
    """Compile every variant again in a fresh process (Inductor/AOTAutograd caches warm)."""
    import subprocess
    cmd = [sys.executable, os.path.abspath(__file__),
           *[a for a in args.argv_child if a != "--fresh-cache"], "--compile-only",
           "--no-warm", "--out", out + ".warm.json"]
    subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL)
    try:
        with open(out + ".warm.json") as f:
            return json.load(f)
    except OSError:
        return None


def parse_args():
    """The command line, with --iters, --hbp-option, --quick and --compile-only applied."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"],
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--models", default="mlp,gpt-sdpa,gpt")
    p.add_argument("--iters", default="0,1,2")
    p.add_argument("--threads", type=int, default=1, help="torch threads (CPU), pinned")
    p.add_argument("--quick", action="store_true", help="5 timed steps, 1 warmup (smoke test)")
    p.add_argument("--no-unbatched", dest="unbatched", action="store_false",
                   help="skip the batched=False variants (long RNNs: one VJP per step)")
    p.add_argument("--no-eager", dest="eager", action="store_false", help="skip eager exact")
    p.add_argument("--nofold", action="store_true", help="also hbp at the first k, fold=False")
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--no-projection", dest="projection", action="store_false",
                   help="skip the H100 projection (gpu_projection.py: one more compile per "
                        "variant, Inductor's caches off)")
    p.add_argument("--no-warm", dest="warm", action="store_false",
                   help="skip the second process that measures warm (cached) compile times")
    p.add_argument("--budget", type=float, default=0,
                   help="seconds of compiling for the whole run, shared among the models; "
                        "a model compiles no further variants once its share is spent (0: none)")
    p.add_argument("--fresh-cache", action="store_true",
                   help="compile into a new, empty Inductor cache dir (a truly cold compile; "
                        "the warm child shares it)")
    p.add_argument("--compile-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None)
    p.add_argument("--hbp-option", action="append", default=[], metavar="NAME=VALUE",
                   help="an hbp_backend option for the hbp variants (a Python literal or a "
                        "string), e.g. rnn_time_chunks=auto; repeatable")
    args = p.parse_args()
    if args.fresh_cache:                    # read by Inductor at compile time; the child inherits
        import tempfile
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="hbp_bench_cache_")
    args.argv_child = [a for a in sys.argv[1:]]
    args.iters = [int(k) for k in args.iters.split(",")]
    args.hbp_options = dict(_option(o) for o in args.hbp_option)
    args.steps, args.warmup = (5, 1) if args.quick else (args.steps, 3)
    if args.compile_only:                   # the warm-compile child: compile, time nothing
        args.steps, args.warmup, args.memory, args.projection = 0, 0, False, False
    return args


def run_header(args, dev) -> dict:
    """What a result file says of its run: machine, versions, settings, how figures are made."""
    from gpu_projection import H100
    return dict(projection_constants=H100 if args.projection else None,torch=torch.__version__, python=platform.python_version(),
                hbp_options=args.hbp_options,
                device=args.device, threads=torch.get_num_threads(),
                omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
                glibc_tunables=os.environ.get("GLIBC_TUNABLES"),
                device_name=torch.cuda.get_device_name() if dev.type == "cuda"
                else (platform.processor() or platform.machine()),
                cpu_count=os.cpu_count(), steps=args.steps, warmup=args.warmup,
                optimizer="SGD(lr=1e-3)",
                fx_graph_cache=torch._inductor.config.fx_graph_cache,
                inductor_cache_dir=os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
                memory="peak of 2 steps above resident: " + (
                    "torch.cuda.max_memory_allocated" if dev.type == "cuda" else
                    "VmHWM after malloc_trim and a clear_refs reset, minus VmRSS"),
                floor="matmul FLOPs (mm, addmm, bmm, convolution, SDPA) of the forward and "
                      "backward graphs handed to Inductor, over exact Inductor's",
                argv=sys.argv[1:], models={})


def main():
    # Inductor's scheduler walks dependency chains recursively: a 1024-step RNN's forward alone
    # is deeper than Python's default limit (RecursionError in memory.topological_sort_dfs)
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 100_000))
    args = parse_args()
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"bench_step_{args.device}.json")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)

    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True      # as nanoGPT's bench.py
        torch.backends.cudnn.allow_tf32 = True
    # every variant adds a cache entry to the same forward code object; keep them all
    for knob in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)

    results = run_header(args, dev)
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
    if args.warm and args.steps:
        warm = warm_compile(args, out)
        for mname, m in (warm or {}).get("models", {}).items():
            for vname, r in m["variants"].items():
                if "compile_s" in r and vname in results["models"][mname]["variants"]:
                    results["models"][mname]["variants"][vname]["compile_warm_s"] = r["compile_s"]
                    results["models"][mname]["variants"][vname]["caches_warm"] = r.get("caches")
        with open(out, "w") as f:
            json.dump(results, f, indent=1, default=str)
    if not args.steps:
        return
    print_table(results)
    print(f"\n{results['device_name']}, torch {torch.__version__}, {results['threads']} threads, "
          f"{args.steps} steps; wall {results['wall_s']:.0f}s; wrote {out}")
    plot(results, os.path.splitext(out)[0] + ".png")


if __name__ == "__main__":
    main()
