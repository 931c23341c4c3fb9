"""Capture functions: what each member of a group computes privately to feed its block.

A GRU step's input projection W_ih x_t + b_ih reads no state: it is a capture of step t. Left
outside the stream, its gradient reaches W_ih as T separate small backwards (T matmuls and as
many graph nodes in the backward, which then grows with T). When every member computes its
captures with the same ops from its own inputs (x_t) and shared ones (W_ih, b_ih), the group
gets a capture function (leaves...) -> captures: the forward still computes each member's
captures where the graph did, and the final VJP differentiates the function once, vmapped over
the members, from the capture cotangents the block VJPs return.
"""
from __future__ import annotations

import dataclasses
import hashlib
import operator
from typing import Optional

import torch
import torch.fx as fx

from .batching import capture_batching_problem
from .blocks import Block
from .groups import Group, _meta_key
from .ops import INDEXING_OPS, VIEW_TO_RESHAPE
from .rules import GraphIndex

aten = torch.ops.aten

MAX_OPS = 64                            # a capture function is a few ops (matmul, split, bias)


@dataclasses.dataclass
class CaptureFn:
    """(*leaves) -> (*values) for every member of a group, and where the values are captured."""

    gm: fx.GraphModule
    leaves: list[list[fx.Node]]         # per member, the function's inputs
    shared: list[bool]                  # per leaf: one node for every member (a weight)
    outputs: list[tuple]                # per value: its positions, ("cap" | "rcap", j)
    n_ops: int
    # per leaf: (src, dim, index per member) when each member's leaf is src.select(dim, index)
    # (x[:, t] of a loop): the leaf's gradients then go to src as one tensor, not T selects
    sources: list = dataclasses.field(default_factory=list)


def _absorbable(n: fx.Node) -> bool:
    if n.op != "call_function":
        return False
    if n.target is operator.getitem:
        return True
    return isinstance(n.target, torch._ops.OpOverload) and n.target not in INDEXING_OPS \
        and not n.target._schema.is_mutable \
        and torch.Tag.nondeterministic_seeded not in n.target.tags


def _private_cone(targets: list[fx.Node], inside: set) -> set:
    """Ancestors of the targets whose every reader is the member's block, r, or the cone."""
    cone, changed = set(), True
    while changed and len(cone) <= MAX_OPS:
        changed = False
        frontier = list(targets) + [i for n in cone for i in n.all_input_nodes]
        for n in frontier:
            if n not in cone and _absorbable(n) and n.users \
                    and all(u in inside or u in cone for u in n.users):
                cone.add(n)
                changed = True
    # a getitem whose multi-output source stays outside is an input, not part of the function
    return {n for n in cone if n.target is not operator.getitem or n.args[0] in cone}


def _targets(blk: Block, group: Group) -> list[fx.Node]:
    """The member's per-member (unshared) capture values, block's then r's, each once."""
    values = [c for c, s in zip(blk.captures, group.shared) if not s]
    values += [c for c, s in zip(blk.step.residual_caps, group.residual_shared) if not s]
    return list(dict.fromkeys(values))


def _outline(blk: Block, values: list, cone: set, index: GraphIndex):
    """(signature, leaves, positions per value, graph) of one member's capture function (a
    graph, not a module: only the first member's becomes one)."""
    ordered = sorted(cone, key=index.pos.__getitem__)
    leaves = list(dict.fromkeys(i for n in ordered for i in n.all_input_nodes if i not in cone))
    local = {leaf: f"leaf{i}" for i, leaf in enumerate(leaves)}
    key = [_meta_key(leaf) for leaf in leaves]
    graph = fx.Graph()
    env = {}
    for leaf in leaves:
        env[leaf] = graph.placeholder(local[leaf])
        env[leaf].meta["val"] = leaf.meta.get("val")
    for i, n in enumerate(ordered):
        local[n] = f"n{i}"
        key.append((str(n.target), repr(fx.node.map_arg((n.args, n.kwargs), local.get)),
                    _meta_key(n)))
        env[n] = graph.node_copy(n, env.__getitem__)
        if env[n].target in VIEW_TO_RESHAPE:
            env[n].target = aten.reshape.default
    positions = [tuple([("cap", j) for j, c in enumerate(blk.captures) if c is v] +
                       [("rcap", j) for j, c in enumerate(blk.step.residual_caps) if c is v])
                 for v in values]
    key.append(("out", [local[v] for v in values], positions))
    graph.output(tuple(env[v] for v in values))
    signature = hashlib.sha1(repr(key).encode()).hexdigest()
    return signature, leaves, positions, graph


def capture_fn(blocks: list[Block], group: Group, index: GraphIndex) -> Optional[CaptureFn]:
    """The group's capture function, or None (a single member, nothing private, members that
    compute their captures differently, or no input that differs between members)."""
    if group.size < 2:
        return None
    found = []
    for l in group.members:
        blk = blocks[l]
        inside = set(blk.body) | set(blk.step.residual) | set(blk.step.outputs)
        targets = _targets(blk, group)
        cone = _private_cone(targets, inside)
        values = [t for t in targets if t in cone]
        if not values or len(cone) > MAX_OPS:
            return None
        found.append(_outline(blk, values, cone, index))
    signature, _, positions, graph = found[0]
    if any(f[0] != signature for f in found):
        return None
    gm = fx.GraphModule(torch.nn.Module(), graph)
    leaves = [f[1] for f in found]
    if not all(isinstance(leaf.meta.get("val"), torch.Tensor) for leaf in leaves[0]):
        return None                     # a symbolic size or a tuple as an input
    shared = [len({ls[i] for ls in leaves}) == 1 for i in range(len(leaves[0]))]
    if all(shared) or not any(leaf.meta["val"].dtype.is_floating_point for leaf in leaves[0]):
        return None                     # nothing to vmap over, or nothing to differentiate
    if capture_batching_problem(gm, shared) is not None:
        return None                     # the captures stay per member, as before
    n_ops = sum(1 for n in gm.graph.nodes if n.op == "call_function"
                and n.target is not operator.getitem)
    sources = [None if s else _select_source([ls[i] for ls in leaves])
               for i, s in enumerate(shared)]
    return CaptureFn(gm, leaves, shared, positions, n_ops, sources)


def _select_source(leaves: list[fx.Node]) -> Optional[tuple]:
    """(src, dim, indices) if every leaf is a distinct src.select(dim, i) of one src, else None."""
    if not all(n.target is aten.select.int for n in leaves):
        return None
    src, dim = leaves[0].args[0], leaves[0].args[1]
    val = src.meta.get("val") if isinstance(src, fx.Node) else None
    if not isinstance(val, torch.Tensor) or not all(isinstance(s, int) for s in val.shape):
        return None
    dim = dim % val.dim()
    index = []
    for n in leaves:
        if n.args[0] is not src or n.args[1] % val.dim() != dim or not isinstance(n.args[2], int):
            return None
        index.append(n.args[2] % val.shape[dim])
    return (src, dim, tuple(index)) if len(set(index)) == len(index) else None
