"""Fold a layer norm's affine weights into the weight gradients of the linears it feeds.

The final VJP of Highway-BP needs parameter gradients only. In a block that starts with
y = LayerNorm(x) = x_hat * gamma + beta followed by linears h_i = y W_i^T, exact backprop computes
dy = sum_i dh_i W_i (one matmul per linear) only to get d gamma and d beta. With
M_i = dh_i^T x_hat (the matmul that dW_i needs anyway, on x_hat instead of y):

    dW_i    = M_i * gamma  (per input column)  +  colsum(dh_i) outer beta
    d gamma = sum_i sum over output rows of W_i * M_i
    d beta  = sum_i colsum(dh_i) @ W_i

so the matmuls dh_i W_i are never computed, and k = 0 costs less than exact backprop.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..analysis.ops import RESHAPE_OPS

aten = torch.ops.aten
NORM_OUTPUT = "hbp_norm_output"        # node.meta tag: a norm output rebuilt in the backward


def _add_terms(node: fx.Node) -> list[fx.Node]:
    if node.target is aten.add.Tensor and len(node.args) == 2 and not node.kwargs \
            and all(isinstance(a, fx.Node) for a in node.args):
        return _add_terms(node.args[0]) + _add_terms(node.args[1])
    return [node]


def _strip_reshapes(node: fx.Node) -> tuple[fx.Node, list]:
    """(base, [shape, ...]) for a chain of reshapes ending at node."""
    shapes = []
    while isinstance(node, fx.Node) and node.target in RESHAPE_OPS:
        shapes.append(node.args[1])
        node = node.args[0]
    return node, shapes[::-1]


def _weight_grad_of(dh: fx.Node):
    """The dW = mm(t(dh), a) node of a linear whose output cotangent is dh (2-D), if any."""
    for t in dh.users:
        if t.target is aten.t.default:
            for mm in t.users:
                if mm.target is aten.mm.default and mm.args[0] is t:
                    return t, mm
    return None, None


def _fold_one(graph: fx.Graph, norm_bw: fx.Node) -> bool:
    """Fold one native_layer_norm_backward whose input gradient is unused; False if no match."""
    grad_out, _, shape, mean, rstd, weight, bias = norm_bw.args[:7]
    outs = {u.args[1]: u for u in norm_bw.users if u.target is operator.getitem}
    if weight is None or (0 in outs and outs[0].users) or len(shape) != 1 \
            or len(grad_out.users) != 1:
        return False
    matches = []
    for term in _add_terms(grad_out):
        mm, _ = _strip_reshapes(term)
        if mm.target is not aten.mm.default:
            return False
        dh, w_mat = mm.args
        t, dw = _weight_grad_of(dh)
        if dw is None:
            return False
        base, shapes = _strip_reshapes(dw.args[1])
        tag = base.meta.get(NORM_OUTPUT)
        if tag is None or tag["mean"] is not mean or tag["rstd"] is not rstd \
                or tag["weight"] is not weight or tag["bias"] is not bias:
            return False
        matches.append((dh, w_mat, t, dw, tag["x_hat"], shapes))

    def call(target, *args):
        return graph.call_function(target, args)

    d_gamma = d_beta = None
    for dh, w_mat, t, dw, x_hat, shapes in matches:
        with graph.inserting_before(dw):
            flat = x_hat
            for s in shapes:
                flat = call(aten.reshape.default, flat, s)
            m = call(aten.mm.default, t, flat)                        # (out, in) = dh^T x_hat
            colsum = call(aten.sum.dim_IntList, dh, [0])              # (out,)
            new_dw = call(aten.mul.Tensor, m, weight)
            if bias is not None:
                outer = call(aten.mul.Tensor, call(aten.unsqueeze.default, colsum, 1),
                             call(aten.unsqueeze.default, bias, 0))
                new_dw = call(aten.add.Tensor, new_dw, outer)
                # colsum @ W as an elementwise product and a sum (under vmap, a matvec
                # would become a bmm)
                db = call(aten.sum.dim_IntList, call(aten.mul.Tensor, w_mat, call(
                    aten.unsqueeze.default, colsum, 1)), [0])
                d_beta = db if d_beta is None else call(aten.add.Tensor, d_beta, db)
            dg = call(aten.sum.dim_IntList, call(aten.mul.Tensor, w_mat, m), [0])
            d_gamma = dg if d_gamma is None else call(aten.add.Tensor, d_gamma, dg)
        dw.replace_all_uses_with(new_dw)
    if 1 in outs:
        outs[1].replace_all_uses_with(d_gamma)
    if 2 in outs and d_beta is not None:
        outs[2].replace_all_uses_with(d_beta)
    return True


def fold_norm_affine(gm: fx.GraphModule) -> int:
    """Fold every matching norm in a parameters-only backward; returns how many were folded."""
    graph = gm.graph
    # getitem users of an unused input gradient are dead: remove them first
    graph.eliminate_dead_code()
    folded = sum(_fold_one(graph, n) for n in list(graph.nodes)
                 if n.target is aten.native_layer_norm_backward.default)
    if folded:
        from torch.fx.passes.tools_common import legalize_graph
        legalize_graph(gm)                  # new nodes read values defined after the dW
        graph = gm.graph
        graph.eliminate_dead_code()
        graph.lint()
        gm.recompile()
    return folded
