"""Stage 4, codegen: hand the (rewritten) aten graph to AOTAutograd and a code generator.

"inductor" goes through compile_fx, so Inductor's decompositions and joint-graph passes apply;
"eager" runs AOTAutograd's forward and backward graphs as they are (fast tests, bisecting).
Either way `on_graph(name, gm)` sees the forward and backward graphs handed to the generator.
"""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable

import torch.fx as fx

OnGraph = Callable[..., None]        # (name, graph) or (name, None, compile seconds)


def _joint_pass(cache_key: str, on_graph: OnGraph):
    """A joint-graph pass that records the joint graph and puts our options in Inductor's key.

    The rewritten graphs already differ whenever an option does, so a cache hit is safe by
    content; the uuid makes that explicit (and survives any future canonicalisation).
    """
    from torch._inductor import config as inductor_config
    from torch._inductor.custom_graph_pass import CustomGraphPass

    previous = inductor_config.joint_custom_post_pass

    class RecordJoint(CustomGraphPass):
        def __call__(self, graph):
            if previous is not None:
                previous(graph)
            on_graph("joint", graph.owning_module or graph)

        def uuid(self):
            before = previous.uuid() if previous is not None else None
            return f"hbp_compile:{cache_key}:{before}"

    return RecordJoint()


@contextlib.contextmanager
def deep_recursion(limit: int = 100_000):
    """Raise Python's recursion limit for the duration of a compile.

    Inductor's scheduler walks dependency chains recursively; an RNN unrolled over 1024 steps
    (the paper's setting) is deeper than the default limit of 1000 (RecursionError in
    memory.topological_sort_dfs, for exact backprop too)."""
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, limit))
    try:
        yield
    finally:
        sys.setrecursionlimit(old)


def compile_inductor(gm: fx.GraphModule, example_inputs, on_graph: OnGraph, cache_key: str,
                     patches: dict | None = None):
    """compile_fx with an inner compiler that records each partitioned graph first.

    `patches` (the backend's mode and Inductor options) reach compile_fx as config patches,
    which it also applies to the backward, compiled later (so CUDA graphs cover both)."""
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    def inner_compile(g, inputs, **kwargs):
        name = "backward" if kwargs.get("is_backward") else "forward"
        on_graph(name, g)
        t0 = time.perf_counter()
        with deep_recursion():          # the backward compiles later, at the first backward
            compiled = compile_fx_inner(g, inputs, **kwargs)
        on_graph(name, None, time.perf_counter() - t0)
        code = getattr(compiled, "source_code", None)    # Inductor's generated module
        if code is not None:
            on_graph(f"{name}_code", code)
        return compiled

    patches = {**(patches or {}), "joint_custom_post_pass": _joint_pass(cache_key, on_graph)}
    with deep_recursion():
        return compile_fx(gm, example_inputs, inner_compile=inner_compile,
                          config_patches=patches)


def compile_eager(gm: fx.GraphModule, example_inputs, on_graph: OnGraph, cache_key: str,
                  patches: dict | None = None):
    """AOTAutograd with boxed eager compilers: the same graphs, run without codegen."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    def recorder(name):
        def compiler(g, _inputs):
            on_graph(name, g)
            return make_boxed_func(g.forward)
        return compiler

    def partition(joint, joint_inputs, **kwargs):
        on_graph("joint", joint)
        return min_cut_rematerialization_partition(joint, joint_inputs, **kwargs)

    backend = aot_autograd(fw_compiler=recorder("forward"), bw_compiler=recorder("backward"),
                           inference_compiler=recorder("inference"), partition_fn=partition)
    return backend(gm, example_inputs)


def compile_graph(gm, example_inputs, codegen: str, on_graph: OnGraph, cache_key: str,
                  patches: dict | None = None):
    """Compile with the configured code generator (eager ignores Inductor's patches)."""
    compile_fn = compile_inductor if codegen == "inductor" else compile_eager
    return compile_fn(gm, example_inputs, on_graph, cache_key, patches)


def count_block_vjps(bw: fx.GraphModule) -> dict[str, dict[str, int]]:
    """Per stream and round: how many distinct block-VJP calls the backward graph holds."""
    calls: dict = {}
    for n in bw.graph.nodes:
        tags = n.meta.get("custom") or {}
        if "hbp_round" in tags:
            key = (tags["hbp_stream"], str(tags["hbp_round"]))
            calls.setdefault(key, set()).add(tags["hbp_call"])
    out: dict = {}
    for (stream, rnd), ids in sorted(calls.items(), key=lambda kv: _round_order(kv[0][1])):
        out.setdefault(stream, {})[rnd] = len(ids)
    return out


def _round_order(r: str):
    return (1, 0) if r == "final" else (0, int(r))
