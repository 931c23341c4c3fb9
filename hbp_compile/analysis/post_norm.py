"""Post-LN steps x_{l+1} = LayerNorm(x_l + z_l), rewritten in the paper's algebra.

LayerNorm's Jacobian mixes the features of a row, so LN(x + z) is no pointwise residual
function as it stands. The paper moves the statistics into the block:

    mu, rstd = stats(x + z)                         block outputs (they read x through z)
    x_{l+1}  = (x + z - mu) * rstd * w + b          r(x, z, mu, rstd): K_l = diag(w * rstd)

Exact backprop is unchanged (the total derivative is the same), and the pointwise rule then
finds the step. Only the backward uses this algebra: a stream's forward computes x_{l+1} with
native_layer_norm(x + z) as the exact compile does (groups.py: the residual's forward form),
so the forward's numbers stay the exact compile's to the bit. Norms that end up in no stream
are put back as native_layer_norm, so an exact region of the graph runs the kernel it always
ran.
"""
from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

from .rules import KIND, NOT_A_STEP, POST_LN, GraphIndex, identity_residual, tensor_meta

aten = torch.ops.aten


@dataclasses.dataclass
class PostNorm:
    """One split LayerNorm: its original arguments and the node that now computes its output."""

    args: tuple                      # (u, normalized_shape, weight, bias, eps)
    out: fx.Node                     # (x + z - mu) * rstd * w + b


def _emit(graph: fx.Graph, like: fx.Node, target, *args, **kwargs) -> fx.Node:
    """A call_function node with its fake value computed, carrying `like`'s module stack."""
    from torch._guards import detect_fake_mode

    node = graph.call_function(target, args, kwargs)
    vals = fx.node.map_arg((args, kwargs), lambda n: n.meta["val"])
    fake_mode = detect_fake_mode(torch.utils._pytree.tree_leaves(vals))
    with fake_mode:
        node.meta["val"] = target(*vals[0], **vals[1])
    for key in ("nn_module_stack", "stack_trace"):
        if key in like.meta:
            node.meta[key] = like.meta[key]
    node.meta[NOT_A_STEP] = True
    return node


def _candidates(graph: fx.Graph) -> list[tuple]:
    """(norm, its output getitem, x, z) for every LayerNorm(x + z) of a residual add."""
    index, found = GraphIndex(graph), []
    for ln in graph.nodes:
        if ln.target is not aten.native_layer_norm.default:
            continue
        u = ln.args[0]
        # post-LN: the add feeds only the norm (in pre-LN, x + z is itself the next state)
        step = identity_residual(u, index) \
            if isinstance(u, fx.Node) and len(u.users) == 1 else None
        val = tensor_meta(u)
        # only the normalised output may be read (mean and rstd are backward-only values), and
        # only full-precision inputs: a bf16 LayerNorm accumulates in fp32 inside its kernel
        if step is None or val is None or val.dtype not in (torch.float32, torch.float64) \
                or len(ln.users) != 1:
            continue
        (out,) = ln.users
        if out.target is operator.getitem and out.args[1] == 0:
            found.append((ln, out, step.stream, step.branch))
    return found


def split_post_norms(graph: fx.Graph) -> list[PostNorm]:
    """Rewrite chains of LayerNorm(x + z), each add a residual step, into the paper's algebra.

    A norm counts as post-LN when it links to another such norm (its output is the next one's
    x, or its x is the previous one's output). A lone LayerNorm(x_L + z) closing a pre-LN stream
    is the head's final norm (GPT's ln_f), not a residual function, and stays as it is."""
    candidates = _candidates(graph)
    outputs = {out for _, out, _, _ in candidates}
    streams = {x for _, _, x, _ in candidates}
    replaced, found = {}, []
    for ln, old_out, x, z in candidates:
        if x not in outputs and old_out not in streams:
            continue
        x = replaced.get(x, x)
        u, shape, w, b, eps = ln.args
        dims = list(range(-len(shape), 0))
        with graph.inserting_before(ln):
            var_mean = _emit(graph, ln, aten.var_mean.correction, u, dims,
                             correction=0, keepdim=True)
            var = _emit(graph, ln, operator.getitem, var_mean, 0)
            mu = _emit(graph, ln, operator.getitem, var_mean, 1)
            rstd = _emit(graph, ln, aten.rsqrt.default, _emit(graph, ln, aten.add.Tensor, var, eps))
            out = _emit(graph, ln, aten.mul.Tensor,
                        _emit(graph, ln, aten.sub.Tensor, _emit(graph, ln, aten.add.Tensor, x, z),
                              mu), rstd)
            if w is not None:
                out = _emit(graph, ln, aten.mul.Tensor, out, w)
            if b is not None:
                out = _emit(graph, ln, aten.add.Tensor, out, b)
        out.meta.pop(NOT_A_STEP)
        out.meta[KIND] = "post-LN"
        out.meta[POST_LN] = (shape, w, b, eps)          # the forward runs the norm itself
        u.meta[NOT_A_STEP] = True                       # feeds the statistics only now
        old_out.replace_all_uses_with(out)
        replaced[old_out] = out
        graph.erase_node(old_out)
        graph.erase_node(ln)
        found.append(PostNorm((u, shape, w, b, eps), out))
    return found


def restore_post_norms(graph: fx.Graph, split: list[PostNorm]) -> int:
    """Put split norms that no stream took back to native_layer_norm; returns how many.

    Run after dead-code elimination: the split norms a stream took are gone from the graph."""
    alive = set(graph.nodes)
    restored = 0
    for pn in split:
        if pn.out not in alive:
            continue
        with graph.inserting_before(pn.out):
            ln = graph.call_function(aten.native_layer_norm.default, pn.args)
            out = graph.call_function(operator.getitem, (ln, 0))
        out.meta = {k: v for k, v in pn.out.meta.items() if k not in (KIND, NOT_A_STEP)}
        pn.args[0].meta.pop(NOT_A_STEP, None)
        pn.out.replace_all_uses_with(out)
        restored += 1
    if restored:
        graph.eliminate_dead_code()
    return restored
