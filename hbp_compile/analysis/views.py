"""Streams through views: move reshapes, transposes and no-op casts off the residual adds.

A model may reshape its stream between two residual adds (OPT's decoder layer flattens the
stream to 2-D for its MLP and views it back to 3-D after the add). The add then reads a view of
x_l, not x_l, and the chain of residual steps breaks there. A view P is invertible and moves no
value, so

    P(x) + z  ==  P(x + P^-1(z))          (elementwise, to the bit)

This pass rewrites every residual add of that form whose x is another step's output into the
right-hand side: the add now reads x itself, the stream continues through it in x's shape (K_l
stays the identity there), the block body starts with P(x) and ends with P^-1(z), and the add's
readers get P of the new add. A P followed by its inverse (OPT's view back to 3-D) folds away,
so the next add reads the new one.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .ops import PERMUTE_OPS, REINDEX_OPS
from .post_norm import _emit
from .rules import (KIND, NOT_A_STEP, GraphIndex, identity_residual, match_residual_step,
                    tensor_meta)

aten = torch.ops.aten

VIEWS = "hbp_views"          # on a rewritten add: the view ops it was moved through


def _moves_no_value(n: fx.Node) -> bool:
    """A shape op that moves no value: a reshape, a permutation, a cast to its own dtype."""
    if not isinstance(n, fx.Node) or n.op != "call_function" or \
            n.target not in REINDEX_OPS | PERMUTE_OPS:
        return False
    a, out = tensor_meta(n.args[0]) if n.args else None, tensor_meta(n)
    # (sizes may be symbolic: asked without adding a guard)
    if a is None or out is None or a.dtype != out.dtype or a.device != out.device \
            or not statically_known_true(a.numel() == out.numel()):
        return False
    if n.target is aten._to_copy.default:
        return set(n.kwargs) <= {"dtype", "device", "layout", "memory_format"}
    return True


def _known_equal(a, b) -> bool:
    """Sizes (or strides) equal for every value of their symbols, asked without a guard."""
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


def _view_chain(v: fx.Node) -> list[fx.Node]:
    """The view ops from the nearest non-view value up to v, outermost last."""
    chain = []
    while _moves_no_value(v):
        chain.append(v)
        v = v.args[0]
    return chain[::-1]


def _shape_args(graph: fx.Graph, like: fx.Node, a: fx.Node) -> list:
    """a's sizes as graph arguments: ints, or sym_size nodes for symbolic dimensions."""
    sizes = []
    for d, s in enumerate(tensor_meta(a).shape):
        sizes.append(s if isinstance(s, int) else _emit(graph, like, aten.sym_size.int, a, d))
    return sizes


def _inverse(graph: fx.Graph, like: fx.Node, chain: list[fx.Node], z: fx.Node) -> fx.Node:
    """P^-1(z) for P the composition of `chain`."""
    for op in reversed(chain):
        a = op.args[0]
        if op.target in REINDEX_OPS:
            z = _emit(graph, like, aten.reshape.default, z, _shape_args(graph, like, a))
        elif op.target is aten.permute.default:
            perm = list(op.args[1])
            inv = [perm.index(i) for i in range(len(perm))]
            z = _emit(graph, like, aten.permute.default, z, inv)
        else:                                       # transpose.int, t: their own inverse
            z = _emit(graph, like, op.target, z, *op.args[1:])
    return z


def _apply(graph: fx.Graph, like: fx.Node, chain: list[fx.Node], y: fx.Node) -> fx.Node:
    """P(y): the chain's ops with y in place of their first input."""
    for op in chain:
        y = _emit(graph, like, op.target, y, *op.args[1:], **op.kwargs)
    return y


def _fold_inverse(p_of_y: fx.Node, y: fx.Node, chain: list[fx.Node]) -> None:
    """A reader of P(y) that reshapes it back to y's shape and strides reads y itself."""
    if any(op.target in PERMUTE_OPS for op in chain):
        return
    want = tensor_meta(y)
    for u in list(p_of_y.users):
        while _moves_no_value(u) and u.target in REINDEX_OPS:
            out = tensor_meta(u)
            if _known_equal(out.shape, want.shape) and _known_equal(out.stride(), want.stride()):
                u.replace_all_uses_with(y)
                break
            if len(u.users) != 1:
                break
            (u,) = u.users


def push_views_off_streams(graph: fx.Graph) -> int:
    """Rewrite each residual add P(x) + z as P(x + P^-1(z)); returns how many were rewritten."""
    index, pushed = GraphIndex(graph), 0
    for add in list(graph.nodes):
        step = identity_residual(add, index) if add.target is aten.add.Tensor else None
        chain = _view_chain(step.stream) if step is not None else []
        # only where the view hides a stream state (x is another step's output): a stream
        # that starts at a view starts there
        if not chain or step.node.meta.get(KIND) or \
                match_residual_step(chain[0].args[0], index) is None:
            continue
        x, z = chain[0].args[0], step.branch
        with graph.inserting_before(add):
            new = _emit(graph, add, aten.add.Tensor, x, _inverse(graph, add, chain, z))
            new.meta.pop(NOT_A_STEP)
            new.meta[VIEWS] = tuple(str(op.target).replace("aten.", "") for op in chain)
            p_of_new = _apply(graph, add, chain, new)
        add.replace_all_uses_with(p_of_new)
        graph.erase_node(add)
        _fold_inverse(p_of_new, new, chain)
        index = GraphIndex(graph)
        pushed += 1
    if pushed:
        graph.eliminate_dead_code()
    return pushed
