"""Split a block template into a forward that saves activations and a backward that reads them.

The backward of Highway-BP runs every block's VJP k + 1 times. Linearising the template again in
the backward (torch.func.vjp) recomputes the block's forward there; unbatched, AOTAutograd's CSE
merges that recomputation with the stream's forward, but batched (a vmapped forward over stacked
inputs) nothing can merge it: half a forward survives inside the backward. So each group's
template is split once, at pass time, the way AOTAutograd splits a joint graph:

    fw: (*primals) -> (*outputs, *saved)          run per block in the stream's forward
    bw: (*primals, *saved, *cotangents) -> grads  run per round, batched over stacked `saved`

Primals are the template's inputs (x components, captures, random draws); `grads` are the VJP
in each differentiable primal. The backward reads primals directly (weights, x_l, masks), so
`saved` holds only intermediates. View ops are moved into the backward (a view costs nothing to
redo, and saving its base once beats saving three transposes of it).
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Optional

import torch
import torch.fx as fx

aten = torch.ops.aten

# Ops that only re-describe their input's memory: recomputed in the backward, never saved.
VIEW_OPS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.t.default,
    aten.transpose.int, aten.permute.default, aten.expand.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.slice.Tensor,
    aten.select.int, aten.alias.default, aten.split.Tensor, aten.split_with_sizes.default,
    aten.unbind.int, aten.chunk.default, aten.detach.default,
}
# aten graphs are stride-specific: a view recorded on a contiguous intermediate may not be valid
# once vmap adds the member axis. The backward uses reshape.
_VIEW_TO_RESHAPE = {aten.view.default, aten._unsafe_view.default}


@dataclasses.dataclass
class Partition:
    """A template split into its saving forward and its backward (see the module docstring)."""

    fw: fx.GraphModule
    bw: fx.GraphModule
    n_outputs: int                      # the template's outputs, first among fw's
    n_saved: int
    diff: tuple[int, ...]               # primal positions that bw returns a gradient for
    out_diff: tuple[int, ...]           # template outputs that take a cotangent, in bw's order


def _is_view(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:           # a piece of a split, not of a multi-output op
        src = node.args[0]
        return isinstance(src, fx.Node) and src.target in VIEW_OPS
    return node.target in VIEW_OPS


def trace_joint(template: fx.GraphModule, vals: list, diff: list[int], out_diff: list[int]):
    """The template's joint graph (*primals, *cotangents) -> (*outputs, *grads), via make_fx."""
    from torch.fx.experimental.proxy_tensor import make_fx

    n_p = len(vals)

    def joint(*args):
        primals, cots = args[:n_p], args[n_p:]

        def f(*d):
            full = list(primals)
            for i, t in zip(diff, d):
                full[i] = t
            outs = template(*full)
            return tuple(outs[i] for i in out_diff), tuple(outs)

        picked, fn, outs = torch.func.vjp(f, *[primals[i] for i in diff], has_aux=True)
        return (*outs, *fn(tuple(cots)))

    out_vals = [n.meta.get("val") for n in template.graph.output_node().args[0]]
    cots = [out_vals[i].new_empty(out_vals[i].shape) for i in out_diff]
    return make_fx(joint)(*vals, *cots)


def split_joint(joint: fx.GraphModule, n_p: int, n_out: int) -> tuple[fx.GraphModule, fx.GraphModule, int]:
    """(fw, bw, n_saved) from a joint graph with n_p primals, then cotangents, then n_out outputs."""
    graph = joint.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    primals, cots = placeholders[:n_p], placeholders[n_p:]
    outputs = list(graph.output_node().args[0])
    backward = set(cots)
    for n in graph.nodes:                     # everything a cotangent reaches is backward
        if n.op == "call_function" and any(i in backward for i in n.all_input_nodes):
            backward.add(n)
    forward = [n for n in graph.nodes if n.op == "call_function" and n not in backward]
    # views of forward values read by the backward are redone there (run in both graphs)
    redone = set()
    for n in reversed(forward):
        if _is_view(n) and any(u in backward or u in redone for u in n.users):
            redone.add(n)
    in_bw = backward | redone
    saved = [n for n in forward if n not in redone and any(u in in_bw for u in n.users)]

    fw = fx.Graph()
    env = {p: fw.placeholder(p.name) for p in primals}
    for n in forward:
        env[n] = fw.node_copy(n, lambda a: env[a])
    fw.output(tuple(env[o] for o in outputs[:n_out]) + tuple(env[s] for s in saved))

    bw = fx.Graph()
    benv = {p: bw.placeholder(p.name) for p in primals}
    benv.update({s: bw.placeholder(f"saved_{s.name}") for s in saved})
    benv.update({c: bw.placeholder(c.name) for c in cots})
    for n in graph.nodes:
        if n in in_bw and n.op == "call_function":
            benv[n] = bw.node_copy(n, lambda a: benv[a])
            if benv[n].target in _VIEW_TO_RESHAPE:
                benv[n].target = aten.reshape.default
    bw.output(tuple(benv[g] if isinstance(g, fx.Node) else g for g in outputs[n_out:]))
    for old, new in [*env.items(), *benv.items()]:
        new.meta.update(old.meta)
    for g in (fw, bw):
        g.eliminate_dead_code()
        g.lint()
    return fx.GraphModule({}, fw), fx.GraphModule({}, bw), len(saved)


def partition(template: fx.GraphModule, diff_outputs: list[int]) -> Optional[Partition]:
    """Split `template` at its saved activations, or None where it cannot be traced.

    diff_outputs: the outputs that take a cotangent (the zs and differentiable side outputs).
    Every floating-point tensor primal is differentiated; AOTAutograd drops the gradients a
    round does not use.
    """
    from torch._guards import detect_fake_mode

    vals = [n.meta.get("val") for n in template.graph.nodes if n.op == "placeholder"]
    fake_mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    if fake_mode is None or not all(isinstance(v, torch.Tensor) for v in vals):
        return None
    if any(not isinstance(s, int) for v in vals for s in v.shape):
        return None                                     # symbolic sizes: recompute instead
    diff = [i for i, v in enumerate(vals) if v.dtype.is_floating_point]
    n_out = len(template.graph.output_node().args[0])
    with fake_mode:
        joint = trace_joint(template, vals, diff, diff_outputs)
    fw, bw, n_saved = split_joint(joint, len(vals), n_out)
    return Partition(fw, bw, n_out, n_saved, tuple(diff), tuple(diff_outputs))


_LIKE_OPS = {aten.empty_like.default, aten.zeros_like.default, aten.ones_like.default,
             aten.rand_like.default, aten.randn_like.default, aten.full_like.default}


def draws_only(forward: fx.GraphModule, n_random: int) -> fx.GraphModule:
    """A block's drawing form (x, *caps) -> (..., *randoms) cut down to its random draws.

    A draw reads only the shape of a block value (bernoulli(empty_like(h))): that value is
    replaced by an empty tensor of its (static) shape, so computing it is dead code."""
    graph = fx.Graph()
    outs = graph.graph_copy(forward.graph, {})
    graph.output(tuple(outs[len(outs) - n_random:]))
    for n in list(graph.nodes):
        src = n.args[0] if n.target in _LIKE_OPS else None
        if isinstance(src, fx.Node) and src.op != "placeholder":
            val = src.meta["val"]
            with graph.inserting_before(n):
                empty = graph.call_function(aten.empty.memory_format, (list(val.shape),),
                                            {"dtype": val.dtype, "device": val.device})
            empty.meta["val"] = val
            n.replace_input_with(src, empty)
    graph.eliminate_dead_code()
    return fx.GraphModule({}, graph)


def partition_group(group, side_differentiable: list[bool]) -> Optional[Partition]:
    """The group's template split at its saved activations; sets group.recompute_reason if not."""
    t = group.template
    diff_outputs = list(range(t.n_z)) + [t.n_z + i for i, d in enumerate(side_differentiable) if d]
    try:
        part = partition(t.gm, diff_outputs)
    except Exception as e:                          # noqa: BLE001 - becomes the report's reason
        group.recompute_reason = f"could not split fw/bw: {type(e).__name__}: " \
            f"{str(e).splitlines()[0][:160] if str(e) else ''}"
        return None
    if part is None:
        group.recompute_reason = "symbolic sizes: the backward recomputes the forward"
    return part
