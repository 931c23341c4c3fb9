"""Plan the rewrite: cut each stream into segments of blocks that can be outlined together."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.fx as fx

from ..logs import log
from .batching import vjp_problem
from .blocks import Block, BlockError, excluded_by, extract_block
from .captures import capture_fn
from .groups import Group, group_blocks, outline
from .ops import HEAVY_OPS
from .rules import GraphIndex
from .streams import Stream, find_streams
from .widen import widen_stream

aten = torch.ops.aten


@dataclasses.dataclass
class Skip:
    """A residual step (or a whole stream) left to exact backprop, and why."""

    node: str
    reason: str
    wanted: bool = False        # the user asked for it (exclude=): no problem for strict mode


@dataclasses.dataclass
class Segment:
    """Consecutive blocks of one stream that become one HighwayStream call."""

    blocks: list[Block]
    groups: list[Group]
    kind: str
    split: str = ""             # where the stream continues after x_L through a non-residual op

    @property
    def xL(self) -> fx.Node:
        return self.blocks[-1].step.node

    @property
    def x0(self) -> fx.Node:
        return self.blocks[0].x


def _owner_positions(graph: fx.Graph, owner: dict[fx.Node, int]) -> dict[fx.Node, int]:
    """For every node, the latest block position it reads (transitively); -1 if none."""
    latest = {}
    for n in graph.nodes:
        p = owner.get(n, -1)
        for i in n.all_input_nodes:
            p = max(p, latest.get(i, -1))
        latest[n] = p
    return latest


def _split_stream(graph, stream: Stream, index: GraphIndex, claimed: set, skips: list[Skip],
                  exclude: tuple = (), recompute: bool = False, ends: tuple = (0, 0)):
    """(block, template) runs of a stream, cut where a block cannot be outlined or
    differentiated, or reads an earlier block."""
    blocks: list = []
    templates: dict = {}            # signature -> the template of its first block
    problems: dict = {}             # template signature -> why torch.func cannot take it
    for l, step in enumerate(stream.steps):
        try:
            blk = extract_block(step, index)
            matched = excluded_by(blk, exclude) if exclude else None
            if matched:
                raise BlockError(blk.body[0], f"kept exact by exclude={matched}", wanted=True)
            end = _kept_end(l, len(stream.steps), ends)
            if end:
                raise BlockError(blk.body[0], f"kept exact by {end}", wanted=True)
            overlap = next((n for n in blk.body if n in claimed), None)
            if overlap is not None:
                raise BlockError(overlap, "block overlaps a stream rewritten already "
                                          "(a residual add nested inside another block)")
            tpl = outline(blk, templates)
            if tpl.signature not in problems:
                problems[tpl.signature] = vjp_problem(tpl.gm, tpl.n_x, recompute)
            if problems[tpl.signature]:
                raise BlockError(blk.body[0], problems[tpl.signature])
            blocks.append((blk, tpl))
        except BlockError as e:
            skips.append(Skip(step.node.name, f"block {l} of the stream: {e.reason}", e.wanted))
            blocks.append(None)
    owner = {}
    for l, bt in enumerate(blocks):
        if bt is not None:
            blk = bt[0]
            owner.update({n: l for n in blk.body})
            owner.update({n: l for n in blk.step.residual})
            owner.update({n: l for n in blk.step.outputs})
    latest = _owner_positions(graph, owner)
    segments, current, start = [], [], 0
    for l, bt in enumerate(blocks):
        if bt is None:
            if current:
                segments.append(current)
            current, start = [], l + 1
            continue
        blk = bt[0]
        # A capture computed from this segment's own earlier blocks (a block reading x_j for
        # j < l, or another block's internals) would be both input and output of one call.
        bad = next((c for c in (*blk.captures, *blk.step.residual_caps)
                    if latest.get(c, -1) >= start), None)
        if bad is not None:
            skips.append(Skip(blk.step.node.name,
                              f"stream cut before block {l}: it reads {bad.name}, computed by "
                              f"block {latest[bad]} of the same stream"))
            if current:
                segments.append(current)
            current, start = [], l
        current.append(bt)
    if current:
        segments.append(current)
    return segments


def _kept_end(l: int, length: int, ends: tuple) -> str:
    """"exact_first=N" or "exact_last=N" if block l of a stream is one the user keeps exact."""
    first, last = ends
    if l < first:
        return f"exact_first={first}"
    if l >= length - last:
        return f"exact_last={last}"
    return ""


def _next_stream(node: fx.Node, sources: set, depth: int) -> Optional[fx.Node]:
    """The first x_0 of a stream in `sources` that `node` reaches within `depth` hops forward."""
    seen, frontier = set(), [node]
    for _ in range(depth):
        frontier = [u for n in frontier for u in n.users if u not in seen and u.op != "output"]
        seen.update(frontier)
        hit = next((n for n in frontier if n in sources), None)
        if hit is not None or not frontier:
            return hit
    return None


def _why_short(last: Block, sources: set) -> str:
    """Name the ops between a residual add and the next stream, if that is why the stream ends."""
    add = last.step.node
    if _next_stream(add, sources, depth=12) is None:
        return ""
    ops = ", ".join(dict.fromkeys(str(u.target) for u in add.users))
    return (f"; the stream passes through {ops} after the add (a post-norm or an activation "
            f"after the residual add that is not a residual function the pass knows)")


def plan_streams(graph: fx.Graph, min_length: int = 2, exclude: tuple = (),
                 recompute: bool = False, ends: tuple = (0, 0)):
    """Find the streams of a graph and plan their segments; returns (segments, skips, n_steps)."""
    index = GraphIndex(graph)
    streams, unlinked = find_streams(graph, index)
    skips: list[Skip] = []
    claimed: set = set()        # nodes some segment will replace
    inner: set = set()          # nodes inside the blocks of some segment
    segments = []
    sources = {st.x0 for st in streams}
    for stream in streams:
        widening = widen_stream(stream, index)
        if widening.why_not:
            log.debug("stream at %s not widened: %s", stream.steps[0].node, widening.why_not)
        stream = widening.stream
        skips += [Skip(step.node.name, why) for step, why in widening.dropped]
        for run in _split_stream(graph, stream, index, claimed, skips, exclude, recompute,
                                 ends):
            blocks, templates = [b for b, _ in run], [t for _, t in run]
            if len(blocks) < min_length:
                skips.append(Skip(blocks[0].step.node.name,
                                  f"segment of {len(blocks)} block(s) is shorter than "
                                  f"min_length={min_length}" + _why_short(blocks[-1], sources)))
                continue
            groups = group_blocks(blocks, templates)
            for g in groups:
                g.capture = capture_fn(blocks, g, index)
            segments.append(Segment(blocks, groups,
                                    " + ".join(dict.fromkeys(b.step.kind for b in blocks))))
            for b in blocks:
                claimed.update(b.body)
                claimed.update(b.step.residual)
                claimed.update(b.step.outputs)
                inner.update(b.body)
    # A residual add that did not link into a stream is either inside a rewritten block (it is
    # rewritten with that block) or a side branch left to exact backprop.
    loose = [s for s in unlinked if s.node not in inner]
    skips += [Skip(s.node.name, "residual add off the stream (a fork from a stream state)")
              for s in loose]
    nested = {s.node.name for st in streams for s in st.steps if s.node in inner}
    skips = [s for s in skips if s.node not in nested]
    n_steps = sum(1 for st in streams for s in st.steps if s.node not in inner) + len(loose)
    for seg in segments:
        # the next chain may be rewritten or not (a lone block after a projection, left to
        # exact backprop by min_length): either way the split is named and counted
        seg.split, projections = _split_after(seg, sources - {seg.x0}, index)
        for add in projections:               # a residual block whose shortcut is no identity
            skips.append(Skip(add.name, "residual block with a projection shortcut (both sides "
                                        "of the add transform x_l: K_l is dense); the chain is "
                                        "split here and this block runs exact backprop"))
            n_steps += 1
    return segments, skips, n_steps


def _split_after(seg: Segment, sources: set, index: GraphIndex) -> tuple[str, list]:
    """If x_L reaches another stream's x_0 through ops that are no residual step (a projection
    shortcut, a downsampling), say so: the chain is split there and that part runs exact.
    Also returns the adds on that path that join two transformed copies of x_L (projection
    residual blocks), which count as residual blocks left to exact backprop."""
    hit = _next_stream(seg.xL, sources, depth=60)
    if hit is None:
        return "", []
    below, stack = set(), [seg.xL]              # what x_L feeds, up to hit
    while stack:
        for u in stack.pop().users:
            if u not in below and index.pos[u] <= index.pos[hit]:
                below.add(u)
                stack.append(u)
    path, stack = set(), [hit]                  # the nodes between x_L and hit
    while stack:
        n = stack.pop()
        if n in below and n not in path:
            path.add(n)
            stack.extend(n.all_input_nodes)
    ops = [str(n.target).replace("aten.", "").split(".")[0] for n in path
           if n.op == "call_function" and n.target in HEAVY_OPS]
    via = ", ".join(dict.fromkeys(ops)) or "no matmul or convolution"
    projections = [n for n in path if n.target is aten.add.Tensor
                   and all(isinstance(a, fx.Node) and a in path for a in n.args)]
    return (f"split after x_L: the chain goes on to x_0 = %{hit.name} through a step that is "
            f"no residual function ({via}; e.g. a projection shortcut or a downsampling), "
            f"which runs exact backprop"), projections
