"""Residual-function rules: which aten node is a residual step x_{l+1} = r(x_l, z_l), and its K_l.

One small rule per pattern, registered by aten target (JAX ad.py style). A rule looks at one node
and returns the step it recognises, or None. The structural test shared by every rule is that
the branch z_l reads the stream x_l (so x_l + pos_emb, an RMSNorm eps or a RoPE add are not
residual steps) while x_l does not read z_l.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
import torch.fx as fx

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class ResidualStep:
    """x_{l+1} = r(x_l, z_l): `node` is x_{l+1}, `stream` is x_l, `branch` is the block output z_l."""

    node: fx.Node
    stream: fx.Node
    branch: fx.Node
    kind: str            # residual-function kind, names K_l ("identity": K_l = I)


class GraphIndex:
    """Topological positions of a graph's nodes, for bounded dependence queries."""

    def __init__(self, graph: fx.Graph):
        self.pos = {n: i for i, n in enumerate(graph.nodes)}

    def depends_on(self, node: fx.Node, target: fx.Node) -> bool:
        """True if `node` reads `target` transitively (DFS cut off below target's position)."""
        stop = self.pos[target]
        if self.pos[node] < stop:
            return False
        seen, stack = set(), [node]
        while stack:
            n = stack.pop()
            if n is target:
                return True
            if n in seen or self.pos[n] < stop:
                continue
            seen.add(n)
            stack.extend(n.all_input_nodes)
        return False


Rule = Callable[[fx.Node, GraphIndex], Optional[ResidualStep]]
RULES: dict[object, Rule] = {}


def register_rule(*targets) -> Callable[[Rule], Rule]:
    """Register a residual-function rule for the given aten targets."""
    def wrap(rule: Rule) -> Rule:
        for t in targets:
            RULES[t] = rule
        return rule
    return wrap


def tensor_meta(node) -> Optional[torch.Tensor]:
    """The fake tensor a node produces, or None for non-tensor values."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device


@register_rule(aten.add.Tensor)
def identity_residual(node: fx.Node, index: GraphIndex) -> Optional[ResidualStep]:
    """x_{l+1} = x_l + z_l, K_l = I (pre-LN Transformers, residual MLPs, pre-activation ResNets)."""
    if node.kwargs.get("alpha", 1) != 1 or len(node.args) != 2:
        return None
    a, b = node.args
    out = tensor_meta(node)
    if out is None or not isinstance(a, fx.Node) or not isinstance(b, fx.Node):
        return None
    for stream, branch in ((a, b), (b, a)):
        s, z = tensor_meta(stream), tensor_meta(branch)
        # The stream keeps the output's layout; the branch may have another dtype (autocast:
        # an fp32 stream plus a bf16 block output) but must not broadcast.
        if s is None or z is None or not _same_layout(s, out) or z.shape != out.shape:
            continue
        if index.depends_on(branch, stream) and not index.depends_on(stream, branch):
            return ResidualStep(node, stream, branch, "identity")
    return None


def match_residual_step(node: fx.Node, index: GraphIndex) -> Optional[ResidualStep]:
    """The residual step `node` computes, by the rule registered for its target, or None."""
    rule = RULES.get(node.target) if node.op == "call_function" else None
    return rule(node, index) if rule is not None else None
