"""What each of the 2 gloo processes of test_distributed.py runs (spawned, so importable).

Rank r trains nothing: it builds the same float64 ResMLP, wraps it (DDP in either order, or
FSDP2), runs one forward/backward on its own batch and keeps the parameters' gradients after
DDP's all-reduce (FSDP2: gathered from the shards). Rank 0 writes, for the test to assert on:
the gradients of eager exact DDP/FSDP (the oracle: no compile), of Highway-BP at k = L and at
k = 1, the independent eager iteration (tests/oracle.py) at k = 1 on each rank's batch averaged
over the ranks (what DDP's averaging of per-rank Highway-BP gradients must give), and each hbp
run's reports.
"""
import os

import torch
import torch.distributed as dist

from helpers import clone_inputs, oracle
from models import GPT, ResMLP

BLOCKS = 6           # d=64, hidden=256, float64: 266 kB of parameters per block, so that
D, HIDDEN = 64, 256  # DDPOptimizer's 1 MB first bucket cuts the stream
# 4 layers (L = 8 residual steps), d=128, float64: 1.6 MB per layer; with 2 MB buckets
# DDPOptimizer cuts it in four pieces
GPT_LAYERS, GPT_BUCKET_MB = 4, 2
MODELS = {"resmlp": lambda: ResMLP(D, HIDDEN, BLOCKS),
          "gpt": lambda: GPT(vocab=64, block_size=16, n_layer=GPT_LAYERS, n_head=2, n_embd=128)}
MODEL = "resmlp"     # run() sets it in each spawned process


def make_model():
    torch.manual_seed(0)
    return MODELS[MODEL]().double()


def wrap(model, setup: str, backend):
    """The model as the setup runs it; backend None: not compiled (the exact oracle)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    compiled = (lambda m: torch.compile(m, backend=backend)) if backend is not None \
        else (lambda m: m)
    bucket = dict(bucket_cap_mb=GPT_BUCKET_MB) if MODEL == "gpt" else {}
    if setup == "compile(ddp)":
        return compiled(DDP(model, **bucket))
    if setup == "ddp(compile)":
        return DDP(compiled(model), **bucket)
    from torch.distributed.fsdp import fully_shard
    if setup == "fsdp-blocks":
        for blk in model.blocks:
            fully_shard(blk)
    fully_shard(model)                                # "fsdp-root" and "fsdp-blocks"
    return compiled(model)


def full_grads(model) -> dict:
    """name -> gradient, whole (an FSDP2 gradient is a sharded DTensor)."""
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad
        grads[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return grads


def one_step(setup: str, inputs, k=None):
    """(gradients, backend) of one forward/backward; k None: exact, uncompiled."""
    from hbp_compile import hbp_backend

    model = make_model()
    backend = hbp_backend(iters=k, codegen="eager") if k is not None else None
    wrap(model, setup, backend)(*clone_inputs(inputs)).backward()
    return full_grads(model), backend


def oracle_mean(inputs, k: int) -> dict:
    """The eager iteration (tests/oracle.py) on this rank's batch, averaged over ranks."""
    _, grads = oracle(make_model(), inputs, k)
    grads = {n: g for n, g in grads.items() if not n.startswith("input.")}
    for g in grads.values():
        dist.all_reduce(g)
        g /= dist.get_world_size()
    return grads


def summary(backend) -> list[dict]:
    return [dict(rewritten=r.rewritten_blocks, residual=r.residual_steps,
                 streams=[s.length for s in r.streams], distributed=r.distributed,
                 skipped=[s.reason for s in r.skipped], fallback=r.fallback_reason,
                 text=str(r)) for r in backend.reports]


def join(rank: int, port: int) -> None:
    """This process as rank `rank` of a 2-process gloo group on the loopback interface (gloo
    otherwise picks the one the hostname resolves to, which a CI container without a network
    may not have)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", rank=rank, world_size=2)


def probe(rank: int, port: int, out: str):
    """Can this machine run a 2-process gloo group at all (loopback TCP)? Writes the answer."""
    join(rank, port)
    try:
        t = torch.ones(1)
        dist.all_reduce(t)
        if rank == 0:
            torch.save(t.item(), out)
    finally:
        dist.destroy_process_group()


def run(rank: int, setup: str, optimize_ddp, port: int, out: str, model: str = "resmlp"):
    """optimize_ddp: Dynamo's setting (True: DDPOptimizer, False, or "python_reducer", which
    runs DDP's reducer inside compiled autograd's graph of the backward)."""
    global MODEL
    MODEL = model
    join(rank, port)
    torch.set_num_threads(1)
    torch._dynamo.config.optimize_ddp = optimize_ddp
    torch._dynamo.config.compiled_autograd = optimize_ddp == "python_reducer"
    try:
        torch.manual_seed(100 + rank)                 # each rank its own batch
        inputs = make_model().example_inputs(8)
        result = {"exact": one_step(setup, inputs)[0], "oracle_k1": oracle_mean(inputs, 1)}
        L = BLOCKS if MODEL == "resmlp" else 2 * GPT_LAYERS
        for k in (L, 1):
            torch._dynamo.reset()
            result[f"k{k}"], backend = one_step(setup, inputs, k)
            result[f"reports_k{k}"] = summary(backend)
        from torch._dynamo.utils import counters
        result["compiled_autograd_captures"] = counters["compiled_autograd"]["captures"]
        if rank == 0:
            torch.save(result, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()
