"""Widen a stream whose blocks read more of the previous step than x_l: LSTM's (c, h).

In an LSTM the chain of residual steps is the cell state, c_{l+1} = f * c_l + i * g, but block
l + 1 reads h_l = o_l * tanh(c_l), where o_l is an output of block l: a second channel between
steps. Reading h_l as part of the state fixes that. The pointwise "readout" at the head of each
block (tanh(c_l), o_l * tanh(c_l)) moves into the previous step's residual function, o_l becomes
a block output, and the state is x_l = (c_l, h_l), with

    r(x_l, z) = (f * c_l + i * g, o * tanh(f * c_l + i * g)),   K_l = [[f, 0], [o tanh' f, 0]]

a 2 x 2 Jacobian per coordinate (the paper's "stream c, h a block output"; exact at k >= L).
A stream is widened only where a block reads such a carried value; everywhere else nothing
changes.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch.fx as fx

from .blocks import body_nodes
from .rules import GraphIndex, ResidualStep, _has_heavy_op, _pointwise, _same_layout, tensor_meta
from .streams import Stream


def _readout(body: set, x: fx.Node, index: GraphIndex) -> list:
    """Pointwise nodes at the head of a block, computed from x_l and values from outside."""
    readout: list = []
    for n in sorted(body, key=index.pos.__getitem__):
        ins = n.all_input_nodes
        if _pointwise(n) and any(i is x or i in readout for i in ins) \
                and all(i is x or i in readout or i not in body for i in ins):
            readout.append(n)
    return readout


def _match(template: list, x_template: fx.Node, x: fx.Node, index: GraphIndex) -> Optional[dict]:
    """Find the readout `template` (read off at x_template) again at x; node map or None."""
    env = {x_template: x}
    for r in template:
        anchor = next(env[i] for i in r.all_input_nodes if i in env)
        found = None
        for cand in anchor.users:
            if cand.target is not r.target or len(cand.args) != len(r.args) \
                    or cand.kwargs != r.kwargs:
                continue
            ok = True
            for a, c in zip(r.args, cand.args):
                if isinstance(a, fx.Node) and a in env:
                    ok = c is env[a]
                elif isinstance(a, fx.Node):      # a value from outside (o_l): not from x
                    ok = isinstance(c, fx.Node) and not index.depends_on(c, x) \
                        and c not in env.values()
                else:
                    ok = a == c
                if not ok:
                    break
            if ok:
                found = cand
                break
        if found is None:
            return None
        env[r] = found
    return env


@dataclasses.dataclass
class _Head:
    """One block's readout: its nodes and the ones the rest of the block reads (new states)."""

    nodes: list
    outputs: list
    body: set = dataclasses.field(default_factory=set)


@dataclasses.dataclass
class Widening:
    """What widen_stream decided: the stream (widened or as it came), the steps it left out
    of the widened stream with why, and why it did not widen ("" if it did, or had no need)."""

    stream: Stream
    dropped: list = dataclasses.field(default_factory=list)
    why_not: str = ""


def widen_stream(stream: Stream, index: GraphIndex) -> Widening:
    """The stream with x_l widened by the block readouts that carry a value between steps, or
    the stream unchanged where no block reads one (see the module docstring)."""
    steps = stream.steps
    heads = [_head(step, index) for step in steps]
    if not _carries(steps, heads, index):
        return Widening(stream)
    dropped = []
    while heads and not heads[0].outputs:          # a first step whose block reads x_0 itself
        dropped.append((steps[0], "first step of a widened (LSTM-like) stream: its block reads "
                                  "x_0 itself, not the state the later blocks read; it runs "
                                  "exact backprop as part of the prelude"))
        steps, heads = steps[1:], heads[1:]
    why = _unlike_heads(steps, heads)
    if why:
        return Widening(stream, why_not=why)
    # the readout of x_L: the same nodes found again after the last step
    env = _match(heads[-1].nodes, steps[-1].stream, steps[-1].node, index)
    if env is not None:
        heads.append(_Head([env[n] for n in heads[-1].nodes], [env[n] for n in heads[-1].outputs]))
    else:                                          # not computed: the last step stays outside
        dropped.append((steps[-1], "last step of a widened (LSTM-like) stream: the rest of its "
                                   "state (h_L) is never computed; it runs exact backprop"))
        steps = steps[:-1]
        if not steps:
            return Widening(stream, why_not="a single step, whose h_L is never computed")
    wide = [_widened_step(steps[l], heads[l], heads[l + 1], index) for l in range(len(steps))]
    if any(w is None for w in wide):
        return Widening(stream, why_not="a step's residual function has no heavy op between "
                                        "its states and its block outputs")
    return Widening(Stream(wide), dropped)


def _head(step: ResidualStep, index: GraphIndex) -> _Head:
    """The readout at the head of a step's block, and which of its nodes the block reads."""
    _, body = body_nodes(step.zs, {step.stream}, index)
    nodes = _readout(body, step.stream, index)
    return _Head(nodes, [n for n in nodes if any(u in body and u not in nodes for u in n.users)],
                 body)


def _carries(steps, heads, index: GraphIndex) -> bool:
    """Does some block read a value computed from the previous state other than x_l?"""
    for l in range(1, len(steps)):
        prev, h = steps[l - 1].stream, heads[l]
        if any(i not in h.body and i not in h.nodes and i is not steps[l].stream
               and index.depends_on(i, prev) for n in h.nodes for i in n.all_input_nodes):
            return True
    return False


def _unlike_heads(steps, heads) -> str:
    """Why the readouts cannot be one widened state (missing, unlike, or another layout)."""
    if not steps or any(not h.outputs for h in heads):
        return "a block reads no carried value at its head"
    shape = [str(n.target) for n in heads[0].nodes]
    if any([str(n.target) for n in h.nodes] != shape or len(h.outputs) != len(heads[0].outputs)
           for h in heads):
        return "the blocks' readouts differ"
    xv = tensor_meta(steps[0].stream)
    if any(tensor_meta(o) is None or not _same_layout(tensor_meta(o), xv)
           for h in heads for o in h.outputs):
        return "a carried value has another shape or layout than x_l"
    return ""


def _widened_step(step: ResidualStep, head: _Head, nxt: _Head, index: GraphIndex):
    """The step with state (x_l, *head outputs) and r extended by the next block's readout;
    None where r would hold no heavy op (then it is no block's residual function)."""
    states = (step.stream, *head.outputs)
    residual = tuple(sorted(set(step.residual) | set(nxt.nodes), key=index.pos.__getitem__))
    inside = set(residual)
    leaves = sorted({i for n in residual for i in n.all_input_nodes
                     if i not in inside and i not in states}, key=index.pos.__getitem__)
    zs = tuple(z for z in leaves if any(index.depends_on(z, s) for s in states))
    if not any(_has_heavy_op(z, s, index) for z in zs for s in states):
        return None
    caps = tuple(c for c in leaves if c not in zs)
    return ResidualStep(step.node, step.stream, zs, f"{step.kind}, state widened to "
                        f"{1 + len(nxt.outputs)} tensors (LSTM-like)", residual, caps,
                        tuple(head.outputs), tuple(nxt.outputs))
