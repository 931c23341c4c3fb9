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

from .ops import HEAVY_OPS, is_pointwise_op

aten = torch.ops.aten

# node.meta keys set by graph rewrites that prepare steps for the rules (post_norm.py)
NOT_A_STEP = "hbp_not_a_step"        # an add that only looks like x + z (a norm's statistics)
KIND = "hbp_residual_kind"           # the residual kind to report for a step's output node
POST_LN = "hbp_post_ln"              # on a split post-LN step's output: (shape, weight, bias, eps)


@dataclasses.dataclass(frozen=True)
class ResidualStep:
    """x_{l+1} = r(x_l, z_l...): `node` is x_{l+1}, `stream` is x_l, `zs` the block outputs.

    `residual` holds the nodes of r (graph order, ending with `node`) and `residual_caps` the
    values r reads that do not depend on x_l (constants, parameters such as LayerScale's).
    K_l is the Jacobian of r in x_l with the block outputs held fixed: I for "identity".
    """

    node: fx.Node
    stream: fx.Node
    zs: tuple
    kind: str
    residual: tuple = ()
    residual_caps: tuple = ()
    extra_states: tuple = ()            # further components of x_l (LSTM: h beside c)
    extra_outputs: tuple = ()           # the same components of x_{l+1}
    shortcut: int = -1                  # zs[shortcut] is a projection shortcut P(x_l)

    @property
    def branch(self) -> fx.Node:
        return self.zs[0]

    @property
    def states(self) -> tuple:
        """x_l, all components: (stream, *extra_states)."""
        return (self.stream, *self.extra_states)

    @property
    def outputs(self) -> tuple:
        """x_{l+1}, all components: (node, *extra_outputs)."""
        return (self.node, *self.extra_outputs)

    @property
    def identity(self) -> bool:
        return self.kind == "identity"


MAX_SOURCE_SEARCH = 400          # ancestors searched for the x_l of a projection step


class GraphIndex:
    """Topological positions of a graph's nodes, for bounded dependence queries."""

    def __init__(self, graph: fx.Graph):
        self.pos = {n: i for i, n in enumerate(graph.nodes)}
        self.step_outputs: set = set()      # x_{l+1} of the steps found so far (graph order)
        self._near: dict = {}               # node -> its nearest ancestors (memo)

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

    def reads_op(self, node: fx.Node, targets) -> bool:
        """Does node, or anything it reads transitively, call one of `targets`?"""
        seen, stack = set(), [node]
        while stack:
            n = stack.pop()
            if n.target in targets:
                return True
            if n not in seen:
                seen.add(n)
                stack.extend(n.all_input_nodes)
        return False

    def near_ancestors(self, node: fx.Node) -> set:
        """Up to MAX_SOURCE_SEARCH transitive inputs of node, nearest first. Memoised (the
        pointwise cones of nearby adds share their sides); callers must not modify it."""
        seen = self._near.get(node)
        if seen is None:
            seen, frontier = set(), [node]
            while frontier and len(seen) < MAX_SOURCE_SEARCH:
                frontier = [i for n in frontier for i in n.all_input_nodes if i not in seen]
                seen.update(frontier)
            self._near[node] = seen
        return seen


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
    """x_{l+1} = x_l + z_l, K_l = I (pre-LN Transformers, residual MLPs, pre-activation ResNets).

    The branch must reach x_l through a matmul, convolution or attention: GELU's
    x + 0.044715 x^3 is no residual step."""
    if node.kwargs.get("alpha", 1) != 1 or len(node.args) != 2 or node.meta.get(NOT_A_STEP):
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
        if index.depends_on(branch, stream) and not index.depends_on(stream, branch) \
                and _has_heavy_op(branch, stream, index):
            return ResidualStep(node, stream, (branch,), "identity", (node,))
    return None


MAX_RESIDUAL_NODES = 24


def _pointwise(n) -> bool:
    return (isinstance(n, fx.Node) and n.op == "call_function" and is_pointwise_op(n.target)
            and tensor_meta(n) is not None)


def _has_heavy_op(z: fx.Node, x: fx.Node, index: GraphIndex) -> bool:
    """Does z read x through a matmul, convolution or attention (bounded by x's position)?"""
    stop = index.pos[x]
    seen, stack = set(), [z]
    while stack:
        n = stack.pop()
        if n in seen or n is x or index.pos[n] < stop:
            continue
        seen.add(n)
        if n.target in HEAVY_OPS and index.depends_on(n, x):
            return True
        stack.extend(n.all_input_nodes)
    return False


def _pointwise_cone(node: fx.Node) -> set:
    """`node` and the pointwise nodes that feed only it (transitively): the candidate r."""
    cone, changed = {node}, True
    while changed and len(cone) < MAX_RESIDUAL_NODES:
        changed = False
        for n in list(cone):
            for i in n.all_input_nodes:
                if i not in cone and _pointwise(i) and all(u in cone for u in i.users):
                    cone.add(i)
                    changed = True
    return cone


def _residual_candidate(node: fx.Node, index: GraphIndex) -> Optional[tuple[set, list]]:
    """(the pointwise cone ending at node, its inputs in graph order): a candidate r and what
    r reads; None if node is not pointwise or the cone is too large for a residual function."""
    if not _pointwise(node):
        return None
    cone = _pointwise_cone(node)
    if len(cone) > MAX_RESIDUAL_NODES:
        return None
    return cone, sorted({i for n in cone for i in n.all_input_nodes if i not in cone},
                        key=index.pos.__getitem__)


def elementwise_residual(node: fx.Node, index: GraphIndex) -> Optional[ResidualStep]:
    """x_{l+1} = r(x_l, z...) with r pointwise: ReLU after the add, gates a * x + z, the GRU
    update z * h + (1 - z) * n, LSTM's f * c + i * g. K_l = dr/dx_l with the zs held fixed."""
    candidate = _residual_candidate(node, index)
    if candidate is None:
        return None
    cone, leaves = candidate
    out = tensor_meta(node)
    for x in leaves:
        xv = tensor_meta(x)
        if xv is None or not _same_layout(xv, out):
            continue
        zs = [l for l in leaves if l is not x and index.depends_on(l, x)]
        if not zs or not any(_has_heavy_op(z, x, index) for z in zs):
            continue
        caps = [l for l in leaves if l is not x and l not in zs]
        ordered = tuple(sorted(cone, key=index.pos.__getitem__))
        kind = node.meta.get(KIND) or _kind_name(ordered)
        return ResidualStep(node, x, tuple(zs), kind, ordered, tuple(caps))
    return None


PROJECTION = "projection"


def projection_residual(node: fx.Node, index: GraphIndex,
                        starts_stream: bool = False) -> Optional[ResidualStep]:
    """x_{l+1} = r(f(x_l), P(x_l)) with r pointwise and both sides of the add transforming
    x_l: a projection shortcut P (ResNet's 1x1 convolution + BatchNorm downsampling) beside the
    block f. x_l is the latest value both sides read; x_{l+1} may have another shape. The block
    computes both (zs = f(x_l), P(x_l), so that P's batch norm updates its running statistics
    once, in the block); K_l = dr/dp dP/dx_l is dense, and the backward's scan applies it as the
    shortcut's VJP (zs[shortcut], the side with fewer ops after x_l).

    x_l must be the previous step's output, so that the chain links through the projection (a
    norm or activation that both sides read is no x_l), unless `starts_stream`: node is the
    input of a later step (find_residual_steps asks again there, for ResNet-50's first block,
    a projection from the stem)."""
    candidate = _residual_candidate(node, index)
    if candidate is None:
        return None
    cone, leaves = candidate
    sides = [l for l in leaves if tensor_meta(l) is not None and l.op == "call_function"
             and tensor_meta(l).dtype.is_floating_point]
    # the add of the two transformed copies of x_l
    if len(sides) < 2 or not any(n.target is aten.add.Tensor and all(a in sides for a in n.args)
                                 for n in cone):
        return None
    ancestors = {s: index.near_ancestors(s) for s in sides}
    common = set.intersection(*ancestors.values())
    out = tensor_meta(node)
    x = max((c for c in common if tensor_meta(c) is not None and tensor_meta(c).ndim == out.ndim
             and tensor_meta(c).dtype == out.dtype), key=index.pos.__getitem__, default=None)
    if x is None or not (starts_stream or x in index.step_outputs) or \
            not any(_has_heavy_op(z, x, index) for z in sides):
        return None
    zs = tuple(l for l in sides if index.depends_on(l, x))
    caps = tuple(l for l in leaves if l not in zs)
    ordered = tuple(sorted(cone, key=index.pos.__getitem__))
    after_x = [sum(index.pos[a] > index.pos[x] for a in ancestors[z]) for z in zs]
    return ResidualStep(node, x, zs, f"{PROJECTION} ({_kind_name(ordered)})", ordered, caps,
                        shortcut=after_x.index(min(after_x)))


def _kind_name(residual) -> str:
    """"relu-after-add" (post-activation ResNet), else "gated": K_l comes from block outputs."""
    names = [getattr(n.target, "__name__", str(n.target)).split(".")[0] for n in residual]
    if names == ["add", "relu"]:
        return "relu-after-add"
    return f"gated ({len(names)} pointwise ops)"


def match_residual_step(node: fx.Node, index: GraphIndex) -> Optional[ResidualStep]:
    """The residual step `node` computes, or None.

    Both the rule registered for the target and the pointwise rule may match; the step whose
    stream comes first wins. In the GRU update (h - n) * z + n, the add alone reads as n plus
    a branch, but the stream is h: n and z are computed from h.
    """
    if node.op != "call_function":
        return None
    rule = RULES.get(node.target)
    steps = [s for s in (rule(node, index) if rule is not None else None,
                         elementwise_residual(node, index)) if s is not None]
    if not steps:
        return projection_residual(node, index)
    return min(steps, key=lambda s: index.pos[s.stream])
