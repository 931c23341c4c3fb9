"""A labelled projection of a training step on an H100-class GPU, from the kernels Inductor
scheduled for the step's graphs (on whatever device compiled them).

Per kernel (a scheduler node after fusion: a generated kernel, a matmul, an SDPA call):
  bytes   what it reads and writes (Inductor's own count, `get_read_write_buffers_sizes`)
  flops   matmul FLOPs of the aten ops it runs (bench_step.node_matmul_flops; 0 for the rest)
  depth   1 + the deepest kernel it depends on (its `ancestors`): the longest chain of
          dependent kernels is the largest depth

and the step is projected as one stream running the kernels of forward and backward one
after another, each taking

  t = max(LAUNCH_S, bytes / HBM_BYTES_PER_S, flops / MATMUL_FLOPS_PER_S)

A lower bound with optimistic constants (peaks, perfect overlap inside a kernel), not a
measurement: it says what the arithmetic, the memory traffic and the kernel count allow, and
so what batching buys (fewer, larger kernels) where launches dominate. The kernels are the
ones Inductor chose for the device that compiled them (a CPU here): a GPU compile fuses
differently, and a CPU's extern matmuls stand for cuBLAS calls.
"""
from __future__ import annotations

import contextlib
import logging

import torch
import torch._logging

# H100 SXM (80 GB): HBM3 peak bandwidth; dense TF32 tensor-core peak (the GPU benchmark runs
# float32 with TF32 allowed, as nanoGPT does); launch: a kernel launched from Inductor's Python
# wrapper, and one replayed from a CUDA graph (mode="reduce-overhead").
H100 = dict(HBM_BYTES_PER_S=3.35e12, MATMUL_FLOPS_PER_S=494e12, LAUNCH_S=5e-6,
            GRAPH_LAUNCH_S=1e-6)


def _kernel_flops(node, node_flops) -> int:
    """Matmul FLOPs of one scheduler node: of the aten ops it runs (0 for a generated
    pointwise/reduction kernel)."""
    origins = [getattr(getattr(s, "node", None), "origin_node", None) for s in node.get_nodes()]
    return sum(node_flops(o) for o in origins if o is not None)


def _kernels(nodes, node_flops) -> list[dict]:
    """bytes, flops and depth of every scheduler node of one graph, in order."""
    from torch._inductor.ir import MultiOutput
    from torch._inductor.scheduler import NopKernelSchedulerNode
    depth_of_op: dict = {}
    out = []
    for node in nodes:
        if isinstance(node, NopKernelSchedulerNode) or \
                isinstance(getattr(node, "node", None), MultiOutput):  # views, tuple items
            continue
        deps = [depth_of_op[a] for a in node.ancestors if a in depth_of_op]
        depth = 1 + max(deps, default=0)
        for name in node.get_operation_names():
            depth_of_op[name] = depth
        out.append(dict(bytes=int(node.get_read_write_buffers_sizes()),
                        flops=_kernel_flops(node, node_flops), depth=depth))
    return out


class _Capture(logging.Handler):
    """Receives Inductor's per-graph metrics record (the scheduler nodes, while the graph is
    still being lowered) and keeps each graph's kernels."""

    def __init__(self, node_flops):
        super().__init__(logging.INFO)
        self.graphs: list[list[dict]] = []
        self.node_flops = node_flops

    def emit(self, record):
        metrics = record.args if isinstance(record.args, dict) else \
            (record.args[0] if record.args else None)
        if isinstance(metrics, dict) and "nodes_num_elem" in metrics:
            nodes = [n for n, _ in metrics["nodes_num_elem"]]
            self.graphs.append(_kernels(nodes, self.node_flops))


@contextlib.contextmanager
def recording_kernels(node_flops):
    """Within: every graph Inductor compiles (caches off, so that it really schedules one)
    appends its kernels to the yielded list; node_flops(aten node) counts a kernel's FLOPs."""
    log = torch._logging.getArtifactLogger("torch._inductor.compile_fx", "inductor_metrics")
    handler = _Capture(node_flops)
    level, propagate = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        with torch._inductor.config.patch(fx_graph_cache=False, force_disable_caches=True), \
                torch._functorch.config.patch(enable_autograd_cache=False):
            yield handler.graphs
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate


def project(graphs: list[list[dict]], c: dict = H100) -> dict:
    """The projection of one step from its graphs' kernels (see the module docstring)."""
    kernels = [k for g in graphs for k in g]

    def step_s(launch):
        return sum(max(launch, k["bytes"] / c["HBM_BYTES_PER_S"],
                       k["flops"] / c["MATMUL_FLOPS_PER_S"]) for k in kernels)

    return dict(kernels=len(kernels), chain=sum(max((k["depth"] for k in g), default=0)
                                                  for g in graphs),
                bytes=sum(k["bytes"] for k in kernels), flops=sum(k["flops"] for k in kernels),
                h100_ms=step_s(c["LAUNCH_S"]) * 1e3,
                h100_graphs_ms=step_s(c["GRAPH_LAUNCH_S"]) * 1e3)
