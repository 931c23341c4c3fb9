"""Data parallelism around the pass: what DDP and FSDP2 do to the graphs it is handed.

Highway-BP needs a whole stream in one graph. Under `DistributedDataParallel`, Dynamo's
DDPOptimizer (`torch._dynamo.config.optimize_ddp = True`, the default) cuts the model's graph
at gradient-bucket boundaries and calls the backend once per piece, so that each piece's
gradients can be all-reduced while the pieces before it still run their backward. A stream
crossing a cut continues in the next piece; the block the cut runs through stays exact there.
`optimize_ddp = False` hands the backend one graph (the whole stream; DDP's reducer all-reduces
the gradients as they come out of the one backward, so with less overlap). FSDP2's hooks run
outside the compiled graphs (they are `torch._dynamo.disable`d): `fully_shard` on each block
makes a graph per block, and only a `fully_shard` above the stream keeps it in one graph.

This module only reads torch.distributed's state; it changes nothing.
"""
from __future__ import annotations

from typing import Optional

import torch

from .analysis.ops import HEAVY_OPS
from .analysis.rules import GraphIndex

_PIECE = "a piece of DDPOptimizer's split"
_ONE_GRAPH = ("under DDP with torch._dynamo.config.optimize_ddp=False: one graph, the whole "
              "stream; gradients are all-reduced after the backward (no bucket overlap)")


def active_ddp():
    """The DistributedDataParallel module whose forward is running, or None."""
    try:
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:                              # pragma: no cover - no distributed build
        return None
    get = getattr(DistributedDataParallel, "_get_active_ddp_module", None)
    return get() if get is not None else None


def _optimize_ddp_mode() -> str:
    """Dynamo's optimize_ddp setting as a mode name ("ddp_optimizer", "no_optimization", ...)."""
    import torch._dynamo

    get = getattr(torch._dynamo.utils, "get_optimize_ddp_mode", None)
    if get is not None:
        return get()
    mode = torch._dynamo.config.optimize_ddp                     # pragma: no cover
    return {True: "ddp_optimizer", False: "no_optimization"}.get(mode, mode)


def ddp_context() -> Optional[str]:
    """How DDP shapes the graph the backend is compiling now (None: no DDP forward running)."""
    ddp = active_ddp()
    if ddp is None:
        return None
    mode = _optimize_ddp_mode()
    if mode == "ddp_optimizer":
        cap = getattr(ddp, "bucket_bytes_cap", 0) / 2 ** 20
        return (f"{_PIECE} ({cap:.0f} MB gradient buckets, the last "
                f"1 MB first): a stream crossing a cut continues in the next piece and the "
                f"block the cut runs through stays exact; torch._dynamo.config.optimize_ddp="
                f"False keeps the stream in one graph")
    if mode == "no_optimization":
        return _ONE_GRAPH
    return f"under DDP with optimize_ddp={mode!r}"


def fsdp_context() -> Optional[str]:
    """What FSDP2 does to the graphs where fully_shard'ed modules nest (blocks sharded inside a
    sharded model: a graph per block), or None."""
    try:
        from torch.distributed._composable_state import _module_state_mapping
        from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
    except ImportError:                              # pragma: no cover - no distributed build
        return None
    sharded = {id(m): m for m, ref in list(_module_state_mapping.items())
               if isinstance(ref(), FSDPState)}
    inner = {i for m in sharded.values() for sub in m.modules()
             if sub is not m and (i := id(sub)) in sharded}
    if not inner:
        return None
    return (f"{len(inner)} fully_shard'ed (FSDP2) module(s) inside another: FSDP2's hooks run "
            f"outside the compiled graphs, so each sharded module's forward is a graph of its "
            f"own and no stream crosses from one to the next; fully_shard groups of blocks, or "
            f"the model only, to keep a stream in one graph")


def context() -> Optional[str]:
    """How data parallelism shapes the graph the backend is compiling now, or None."""
    return ddp_context() or fsdp_context()


def is_ddp_piece(context: Optional[str]) -> bool:
    """Is this graph (its report's distributed line) a piece of DDPOptimizer's split?"""
    return bool(context) and context.startswith(_PIECE)


CUT_REASON = ("residual step cut by DDPOptimizer's split: its branch began in the previous "
              "piece (graph), so it stays exact")


def cut_steps(graph) -> list:
    """The residual adds a DDPOptimizer cut ran through: x_l + z in a piece where x_l is an
    input of the piece (of the add's shape) and z comes from a matmul, convolution or attention
    that does not read x_l (z's branch began in the previous piece, which handed over x_l and
    an activation of the block)."""
    index = GraphIndex(graph)
    cut = []
    for node in graph.find_nodes(op="call_function", target=torch.ops.aten.add.Tensor):
        a, b = node.args[:2]
        for x, z in ((a, b), (b, a)):
            if _same_shape_input(x, node) and getattr(z, "op", None) == "call_function" \
                    and not index.depends_on(z, x) and index.reads_op(z, HEAVY_OPS):
                cut.append(node)
                break
    return cut


def _same_shape_input(x, node) -> bool:
    """Is x an input of the graph (a placeholder) with node's shape and dtype?"""
    xv, v = getattr(x, "meta", {}).get("val"), node.meta.get("val")
    return getattr(x, "op", None) == "placeholder" and isinstance(xv, torch.Tensor) \
        and isinstance(v, torch.Tensor) and xv.shape == v.shape and xv.dtype == v.dtype
