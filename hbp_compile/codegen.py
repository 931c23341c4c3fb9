"""Stage 4, codegen: hand the (rewritten) aten graph to AOTAutograd and a code generator.

"inductor" goes through compile_fx, so Inductor's decompositions and joint-graph passes apply;
"eager" runs AOTAutograd's forward and backward graphs as they are (fast tests, bisecting).
Either way `on_graph(name, gm)` sees the forward and backward graphs handed to the generator.
"""
from __future__ import annotations

from typing import Callable

import torch.fx as fx

OnGraph = Callable[[str, fx.GraphModule], None]


def compile_inductor(gm: fx.GraphModule, example_inputs, on_graph: OnGraph):
    """compile_fx with an inner compiler that records each partitioned graph first."""
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    def inner_compile(g, inputs, **kwargs):
        on_graph("backward" if kwargs.get("is_backward") else "forward", g)
        return compile_fx_inner(g, inputs, **kwargs)

    return compile_fx(gm, example_inputs, inner_compile=inner_compile)


def compile_eager(gm: fx.GraphModule, example_inputs, on_graph: OnGraph):
    """AOTAutograd with boxed eager compilers: the same graphs, run without codegen."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    def recorder(name):
        def compiler(g, _inputs):
            on_graph(name, g)
            return make_boxed_func(g.forward)
        return compiler

    backend = aot_autograd(fw_compiler=recorder("forward"), bw_compiler=recorder("backward"),
                           inference_compiler=recorder("inference"),
                           partition_fn=min_cut_rematerialization_partition)
    return backend(gm, example_inputs)


def compile_graph(gm, example_inputs, codegen: str, on_graph: OnGraph):
    """Compile with the configured code generator."""
    compile_fn = compile_inductor if codegen == "inductor" else compile_eager
    return compile_fn(gm, example_inputs, on_graph)


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
