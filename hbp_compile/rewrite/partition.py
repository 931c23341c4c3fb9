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
import re
from typing import Optional

import torch
import torch.fx as fx

from ..analysis.ops import LIKE_OPS, VIEW_OPS, VIEW_TO_RESHAPE, is_pointwise_op
from ..report import describe
from .fold import NORM_OUTPUT, fold_norm_affine

aten = torch.ops.aten

@dataclasses.dataclass
class Partition:
    """A template split into its saving forward and its backward (see the module docstring)."""

    fw: fx.GraphModule
    bw: fx.GraphModule
    bw_params: fx.GraphModule           # bw without the x gradients (the final VJP), folded
    n_outputs: int                      # the template's outputs, first among fw's
    n_saved: int
    diff: tuple[int, ...]               # primal positions that bw returns a gradient for
    out_diff: tuple[int, ...]           # template outputs that take a cotangent, in bw's order
    folded: int = 0                     # norms whose affine weights bw_params folds


def _is_view_op(node: fx.Node) -> bool:
    """A node of VIEW_OPS (or a piece of a split): recomputed from its saved base."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:           # a piece of a split, not of a multi-output op
        src = node.args[0]
        return isinstance(src, fx.Node) and src.target in VIEW_OPS
    return node.target in VIEW_OPS


def _is_pointwise(node: fx.Node) -> bool:
    return is_pointwise_op(node.target)


def _recomputed(forward: list[fx.Node], primals: set, backward: set, depth: int = 6) -> set:
    """Forward nodes the backward redoes instead of saving: views (their bases are saved), and
    pointwise chains whose inputs are primals or values saved anyway (GELU's output from its
    saved input, a norm's output from x, mean and rstd): memory for an elementwise pass, and
    AOTAutograd's CSE merges the identical recomputations of different rounds."""
    redone: set = set()
    for n in reversed(forward):
        if _is_view_op(n) and any(u in backward or u in redone for u in n.users):
            redone.add(n)
    in_forward = set(forward)
    needed = {n for n in forward if n not in redone
              and any(u in backward or u in redone for u in n.users)}

    def available(n, d) -> bool:
        if n in primals or n in redone or n in needed:
            return True
        if n not in in_forward or d == 0 or not _is_pointwise(n):
            return False
        if all(available(i, d - 1) for i in n.all_input_nodes):
            redone.add(n)
            return True
        return False

    for n in reversed(forward):
        if n in needed and _is_pointwise(n):
            needed.discard(n)
            if all(available(i, depth) for i in n.all_input_nodes):
                redone.add(n)
            else:
                needed.add(n)
    return redone


def _norm_output(node: fx.Node, saved: set, primals: set):
    """(x, mean, rstd, weight, bias) when `node` is a layer norm's output that the backward
    can rebuild from its input and saved statistics, else None."""
    if node.target is not operator.getitem or node.args[1] != 0:
        return None
    f = node.args[0]
    if f.target is not aten.native_layer_norm.default:
        return None
    stats = {u.args[1]: u for u in f.users if u.target is operator.getitem}
    x, _, weight, bias = f.args[:4]
    if stats.get(1) not in saved or stats.get(2) not in saved or x not in primals \
            or any(p is not None and p not in primals for p in (weight, bias)):
        return None
    return x, stats[1], stats[2], weight, bias


def _rebuild_norm_output(bw: fx.Graph, args, env) -> fx.Node:
    """(x - mean) * rstd * weight + bias, in the backward graph."""
    x, mean, rstd, weight, bias = [None if a is None else env[a] for a in args]
    x_hat = y = bw.call_function(aten.mul.Tensor,
                                 (bw.call_function(aten.sub.Tensor, (x, mean)), rstd))
    if weight is not None:
        y = bw.call_function(aten.mul.Tensor, (y, weight))
    if bias is not None:
        y = bw.call_function(aten.add.Tensor, (y, bias))
    y.meta[NORM_OUTPUT] = dict(x_hat=x_hat, mean=mean, rstd=rstd, weight=weight, bias=bias)
    return y


def trace_joint(template: fx.GraphModule, vals: list, diff: list[int], out_diff: list[int]):
    """The template's joint graph (*primals, *cotangents) -> (*outputs, *grads), via make_fx."""
    from torch.fx.experimental.proxy_tensor import make_fx

    n_p = len(vals)

    def joint(*args):
        # torch.autograd.grad, as AOTAutograd builds its joint graphs: a custom op whose
        # derivative is registered through torch.library (Mixtral's grouped-mm fallback) has
        # a formula here, where torch.func.vjp rejects its autograd.Function
        primals, cots = list(args[:n_p]), args[n_p:]
        for i in diff:
            primals[i] = primals[i].detach().requires_grad_()
        with torch.enable_grad():
            outs = template(*primals)
            pairs = [(outs[i], c) for i, c in zip(out_diff, cots) if outs[i].requires_grad]
            grads = torch.autograd.grad([o for o, _ in pairs], [primals[i] for i in diff],
                                        [c for _, c in pairs], allow_unused=True,
                                        materialize_grads=True) if pairs else \
                [torch.zeros_like(primals[i]) for i in diff]
        return (*[o.detach() for o in outs], *grads)

    out_vals = [n.meta.get("val") for n in template.graph.output_node().args[0]]
    cots = [out_vals[i].new_empty(out_vals[i].shape) for i in out_diff]
    gm = make_fx(joint)(*vals, *cots)
    for n in list(gm.graph.nodes):          # autograd's detaches are values as they are
        if n.target is aten.detach.default:
            n.replace_all_uses_with(n.args[0])
            gm.graph.erase_node(n)
    gm.recompile()
    return gm


def split_joint(joint: fx.GraphModule, n_p: int, n_out: int, n_x: int):
    """(fw, bw, bw_params, n_saved) from a joint graph with n_p primals, then cotangents, then
    n_out outputs and the gradients; bw_params leaves out the n_x input gradients."""
    graph = joint.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    primals, cots = placeholders[:n_p], placeholders[n_p:]
    outputs = list(graph.output_node().args[0])
    backward = set(cots)
    for n in graph.nodes:                     # everything a cotangent reaches is backward
        if n.op == "call_function" and any(i in backward for i in n.all_input_nodes):
            backward.add(n)
    forward = [n for n in graph.nodes if n.op == "call_function" and n not in backward]
    redone = _recomputed(forward, set(primals), backward)
    in_bw = backward | redone
    saved = [n for n in forward if n not in redone and any(u in in_bw for u in n.users)]
    # a norm's output is rebuilt from x, mean and rstd (an elementwise pass) instead of saved
    rebuilt = {n: a for n in saved if (a := _norm_output(n, set(saved), set(primals)))}
    saved = [n for n in saved if n not in rebuilt]

    fw = fx.Graph()
    env = {p: fw.placeholder(p.name) for p in primals}
    for n in forward:
        env[n] = fw.node_copy(n, lambda a: env[a])
    fw.output(tuple(env[o] for o in outputs[:n_out]) + tuple(env[s] for s in saved))

    def backward_graph(grads) -> fx.GraphModule:
        bw = fx.Graph()
        benv = {p: bw.placeholder(p.name) for p in primals}
        benv.update({s: bw.placeholder(f"saved_{s.name}") for s in saved})
        benv.update({c: bw.placeholder(c.name) for c in cots})
        for old, new in benv.items():
            new.meta.update(old.meta)
        for n, args in rebuilt.items():
            benv[n] = _rebuild_norm_output(bw, args, benv)
        for n in graph.nodes:
            if n in in_bw and n.op == "call_function":
                benv[n] = bw.node_copy(n, lambda a: benv[a])
                if benv[n].target in VIEW_TO_RESHAPE:
                    benv[n].target = aten.reshape.default
        bw.output(tuple(benv[g] if isinstance(g, fx.Node) else g for g in grads))
        bw.eliminate_dead_code()
        bw.lint()
        return fx.GraphModule({}, bw)

    for old, new in env.items():
        new.meta.update(old.meta)
    fw.eliminate_dead_code()
    fw.lint()
    grads = outputs[n_out:]
    return fx.GraphModule({}, fw), backward_graph(grads), backward_graph(grads[n_x:]), len(saved)


def partition(template: fx.GraphModule, diff_outputs: list[int], n_x: int = 1,
              fold: bool = True) -> Optional[Partition]:
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
    joint = None
    while joint is None:
        try:
            with fake_mode:
                joint = trace_joint(template, vals, diff, diff_outputs)
        except RuntimeError as e:
            # an input that some op takes as a non-differentiable argument (BatchNorm's running
            # statistics, the CPU flash-attention kernel's mask) gets no gradient; a capture
            # that needs one then fails loudly in the backward (no gradient at that position)
            fixed = _non_differentiable(template, str(e))
            if not fixed & set(diff):
                raise
            diff = [i for i in diff if i not in fixed]
    fw, bw, bw_params, n_saved = split_joint(joint, len(vals), n_out, n_x)
    folded = fold_norm_affine(bw_params) if fold else 0
    return Partition(fw, bw, bw_params, n_out, n_saved, tuple(diff), tuple(diff_outputs), folded)


_NOT_DIFFERENTIABLE = re.compile(r"function '(\w+)' is not differentiable with respect to "
                                 r"argument '(\w+)'")


def _non_differentiable(template: fx.GraphModule, message: str) -> set:
    """Placeholder positions that autograd's error message names as an op's argument with no
    derivative (directly, or through views)."""
    m = _NOT_DIFFERENTIABLE.search(message)
    if m is None:
        return set()
    op_name, arg = m.groups()
    places = list(template.graph.find_nodes(op="placeholder"))
    found = set()
    for n in template.graph.nodes:
        if not isinstance(n.target, torch._ops.OpOverload) or \
                n.target._schema.name.split("::")[-1] != op_name:
            continue
        for i, a in enumerate(n.target._schema.arguments):
            if a.name != arg:
                continue
            value = n.args[i] if i < len(n.args) else n.kwargs.get(arg)
            while isinstance(value, fx.Node) and value.op != "placeholder" and \
                    _is_view_op(value):
                value = value.args[0]
            if isinstance(value, fx.Node) and value.op == "placeholder":
                found.add(places.index(value))
    return found


def draws_only(forward: fx.GraphModule, n_random: int) -> fx.GraphModule:
    """A block's drawing form (x, *caps) -> (..., *randoms) cut down to its random draws.

    A draw reads only the layout of a block value (bernoulli(empty_like(h))): that value is
    replaced by an empty tensor of its (static) shape and strides, so computing it is dead
    code. The strides matter: empty_like keeps them, and a kernel that fills memory in order
    would put the same numbers elsewhere. The empty tensor is aten.empty (permuted to the
    strides), which AOTAutograd's CSE leaves alone: two equal empty_strided nodes merge, and
    then so do the draws CSE does not know as random (randn_like: every block got one mask)."""
    graph = fx.Graph()
    outs = graph.graph_copy(forward.graph, {})
    graph.output(tuple(outs[len(outs) - n_random:]))
    for n in list(graph.nodes):
        # a like-op reads only a layout; so does native_dropout's mask (its output is not drawn)
        src = n.args[0] if n.target in LIKE_OPS or n.target is aten.native_dropout.default \
            else None
        if isinstance(src, fx.Node) and src.op != "placeholder":
            with graph.inserting_before(n):
                n.replace_input_with(src, _empty_like_layout(graph, src.meta["val"]))
    graph.eliminate_dead_code()
    return fx.GraphModule({}, graph)


def _empty_like_layout(graph: fx.Graph, val: torch.Tensor) -> fx.Node:
    """aten.empty of val's shape in val's dim order: an uninitialised tensor with its strides."""
    from torch._prims_common import compute_elementwise_output_logical_to_physical_perm

    perm, _ = compute_elementwise_output_logical_to_physical_perm(val)
    empty = graph.call_function(aten.empty.memory_format, ([val.shape[d] for d in perm],),
                                {"dtype": val.dtype, "device": val.device})
    empty.meta["val"] = val.new_empty([val.shape[d] for d in perm])
    out = graph.call_function(aten.permute.default, (empty, [perm.index(d) for d in range(val.dim())]))
    out.meta["val"] = val
    return out


def partition_group(group, side_differentiable: list[bool], fold: bool = True) -> Optional[Partition]:
    """The group's template split at its saved activations; sets group.recompute_reason if not."""
    t = group.template
    diff_outputs = list(range(t.n_z)) + [t.n_z + i for i, d in enumerate(side_differentiable) if d]
    try:
        part = partition(t.gm, diff_outputs, t.n_x, fold)
    except Exception as e:                          # noqa: BLE001 - becomes the report's reason
        group.recompute_reason = f"could not split fw/bw: {describe(e)}"
        return None
    if part is None:
        group.recompute_reason = "symbolic sizes: the backward recomputes the forward"
    return part
