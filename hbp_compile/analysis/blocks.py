"""Identify each residual step's block: its body nodes, captured inputs and side outputs.

The block of step l is g_l in x_{l+1} = r(x_l, g_l(x_l, captures)): the nodes that read x_l and
feed z_l. Everything else the body reads (parameters, masks, per-step inputs such as W x_t) is a
capture. Body values read outside the block are side outputs (a returned attention map, the
batch statistics that BatchNorm writes into its running buffers).
"""
from __future__ import annotations

import dataclasses
import operator
import re
from typing import Optional

import torch
import torch.fx as fx

from .ops import ABSORBED_OPS, MASKED_RANDOM_OPS, SAVED_RANDOM_OPS
from .rules import GraphIndex, ResidualStep

aten = torch.ops.aten


class BlockError(Exception):
    """A block the pass cannot outline; the message says why (it goes into the report)."""

    def __init__(self, node: fx.Node, reason: str, wanted: bool = False):
        super().__init__(f"{node.name}: {reason}")
        self.node, self.reason = node, reason
        self.wanted = wanted            # the user asked for it (exclude=)


@dataclasses.dataclass
class Block:
    """One block g_l of a stream, as nodes of the captured aten graph."""

    step: ResidualStep
    body: list[fx.Node]                 # graph order; the last feeds z_l
    captures: list[fx.Node]             # inputs of the body other than x_l
    side_outputs: list[fx.Node]         # body values read outside the block
    side_differentiable: list[bool]     # can a gradient reach the side output from the loss?
    randoms: list[fx.Node] = dataclasses.field(default_factory=list)  # drawn once, in forward

    @property
    def x(self) -> fx.Node:
        return self.step.stream

    @property
    def xs(self) -> tuple:
        """All components of x_l (one for every stream but an LSTM-like widened one)."""
        return self.step.states

    @property
    def zs(self) -> tuple:
        return self.step.zs

    @property
    def module_path(self) -> Optional[str]:
        """The innermost module that holds the whole body, with the children the body touches."""
        return module_path(self.body)


def _module_stack(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    paths = []
    for value in stack.values():
        path = value[0] if isinstance(value, tuple) else str(value)
        paths.append(_clean_path(path))
    return paths


_ROOT = re.compile(r"^[LG]\[[^\]]*\](\[\d+\])*\.?")      # L['self'], L['args'][0], G['m']


def _clean_path(path: str) -> str:
    """Dynamo's "L['self'].blocks[0]._modules['attn']" -> "blocks.0.attn"."""
    path = _ROOT.sub("", path)
    path = re.sub(r"_modules\['([^']*)'\]", r"\1", path)
    path = path.replace("['", ".").replace("']", "").replace("[", ".").replace("]", "")
    return re.sub(r"\.+", ".", path).strip(".")


def module_path(nodes: list[fx.Node]) -> Optional[str]:
    """Longest module path shared by every node that carries one, e.g. "h.0[ln_1, attn]"."""
    stacks = [s for s in (_module_stack(n) for n in nodes) if s]
    if not stacks:
        return None
    common = stacks[0]
    for s in stacks[1:]:
        k = 0
        while k < min(len(common), len(s)) and common[k] == s[k]:
            k += 1
        common = common[:k]
    depth = len(common)
    children = []
    for s in stacks:
        if len(s) > depth:
            child = s[depth][len(common[-1]) + 1:] if common else s[depth]
            if child and child not in children:
                children.append(child)
    base = common[-1] if common else ""
    if children and (not common or len(children) < 4):
        return f"{base}[{', '.join(children)}]" if base else ", ".join(children)
    return base or None


def excluded_by(block: Block, patterns) -> Optional[str]:
    """The first module path of the block's nodes that an exclude pattern matches, as
    "pattern (path)", or None."""
    import fnmatch

    for node in block.body:
        for path in _module_stack(node):
            for pattern in patterns:
                if fnmatch.fnmatchcase(path, pattern):
                    return f"{pattern!r} ({path})"
    return None


def _reaches_output(node: fx.Node) -> bool:
    """True if the graph's output reads `node` other than through a buffer write-back (copy_)."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u.op == "output":
                return True
            if u not in seen and u.target is not aten.copy_.default:
                seen.add(u)
                stack.append(u)
    return False


def _is_random(node: fx.Node) -> bool:
    return isinstance(node.target, torch._ops.OpOverload) \
        and torch.Tag.nondeterministic_seeded in node.target.tags and not _dropout_off(node)


def _check_op(node: fx.Node) -> None:
    """Raise BlockError for ops a block template cannot hold."""
    if node.op != "call_function":
        raise BlockError(node, f"{node.op} node inside the block")
    if node.target is operator.getitem:
        return
    if not isinstance(node.target, torch._ops.OpOverload):
        raise BlockError(node, f"non-aten op {node.target} inside the block")
    schema = node.target._schema
    if schema.is_mutable:
        raise BlockError(node, f"{node.target} mutates its input inside the block")
    if _is_random(node) and node.target not in SAVED_RANDOM_OPS | MASKED_RANDOM_OPS:
        # The backward re-runs the block from saved inputs, and this op's draw cannot be saved
        # apart from its data (SDPA's dropout_p > 0: use eager attention or dropout_p = 0).
        raise BlockError(node, f"random op {node.target} transforms data inside the block; "
                               f"its random draw cannot be saved for the backward")


def _dropout_off(node: fx.Node) -> bool:
    """An op that is random only through a dropout probability, called with it at 0 (SDPA)."""
    schema = node.target._schema
    for i, arg in enumerate(schema.arguments):
        if arg.name == "dropout_p":
            value = node.args[i] if i < len(node.args) else node.kwargs.get(
                arg.name, arg.default_value)
            return value == 0
    return False


def body_nodes(zs, xs: set, index: GraphIndex) -> tuple[set, set]:
    """(ancestors of the block outputs zs down to x_l, those of them that read x_l: the body)."""
    stop = min(index.pos[x] for x in xs)
    ancestors, stack = set(), list(zs)
    while stack:
        n = stack.pop()
        if n in ancestors or n in xs or index.pos[n] < stop:
            continue
        ancestors.add(n)
        stack.extend(n.all_input_nodes)
    body = set()
    for n in sorted(ancestors, key=index.pos.__getitem__):   # forward: which ancestors read x_l
        if any(i in xs or i in body for i in n.all_input_nodes):
            body.add(n)
    return ancestors, body


def extract_block(step: ResidualStep, index: GraphIndex) -> Block:
    """Body, captures and side outputs of one residual step's block (BlockError if unsupported)."""
    xs = set(step.states)                       # x_l: one tensor, or (c_l, h_l) for an LSTM
    ancestors, body = body_nodes(step.zs, xs, index)
    changed = True
    while changed:                               # absorb private parameter preprocessing
        changed = False
        for n in ancestors - body:
            if n.op == "call_function" and n.target in ABSORBED_OPS and n.users \
                    and all(u in body for u in n.users):
                body.add(n)
                changed = True
    # A multi-output op (batch norm: out, mean, rstd, new running stats) is one body node; its
    # getitems read outside the block become body nodes, so side outputs are tensors.
    for n in list(body):
        if isinstance(n.meta.get("val"), (tuple, list)):
            body.update(u for u in n.users if u.target is operator.getitem)
    ordered = sorted(body, key=index.pos.__getitem__)
    for n in ordered:
        _check_op(n)
    captures = []
    for n in ordered:
        for i in n.all_input_nodes:
            if i not in xs and i not in body and i not in captures:
                captures.append(i)
    residual = set(step.residual) | set(step.outputs)
    side = [n for n in ordered if any(u not in body and u not in residual for u in n.users)]
    diff = [_is_float(n) and _reaches_output(n) for n in side]
    randoms = [n for n in ordered if _is_random(n)]
    return Block(step, ordered, captures, side, diff, randoms)


def _is_float(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dtype.is_floating_point
