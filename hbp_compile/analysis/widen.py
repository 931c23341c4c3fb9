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


def widen_stream(stream: Stream, index: GraphIndex) -> tuple[Stream, list]:
    """The stream with x_l widened by the block readouts that carry a value between steps, or
    the stream unchanged where no block reads one (see the module docstring); and the steps
    left out of the widened stream, with why."""
    steps = stream.steps
    L = len(steps)
    heads, carried = [], False
    for l, step in enumerate(steps):
        _, body = body_nodes(step.zs, {step.stream}, index)
        nodes = _readout(body, step.stream, index)
        outs = [n for n in nodes if any(u in body and u not in nodes for u in n.users)]
        heads.append(_Head(nodes, outs))
        if l > 0:                                  # reads a value computed from x_{l-1}?
            prev = steps[l - 1].stream
            carried |= any(i not in body and i not in nodes and i is not step.stream
                           and index.depends_on(i, prev)
                           for n in nodes for i in n.all_input_nodes)
    if not carried:
        return stream, []
    dropped = []
    while heads and not heads[0].outputs:          # a first step whose block reads x_0 itself
        dropped.append((steps[0], "first step of a widened (LSTM-like) stream: its block reads "
                                  "x_0 itself, not the state the later blocks read; it runs "
                                  "exact backprop as part of the prelude"))
        steps, heads = steps[1:], heads[1:]
    L = len(steps)
    if L == 0 or any(not h.outputs for h in heads):
        return stream, []
    shape = [str(n.target) for n in heads[0].nodes]
    if any([str(n.target) for n in h.nodes] != shape or len(h.outputs) != len(heads[0].outputs)
           for h in heads):
        return stream, []
    xv = tensor_meta(steps[0].stream)
    if any(tensor_meta(o) is None or not _same_layout(tensor_meta(o), xv)
           for h in heads for o in h.outputs):
        return stream, []
    # the readout of x_L: the same nodes found again after the last step
    env = _match(heads[-1].nodes, steps[-1].stream, steps[-1].node, index)
    if env is not None:
        heads.append(_Head([env[n] for n in heads[-1].nodes], [env[n] for n in heads[-1].outputs]))
    else:                                          # not computed: the last step stays outside
        dropped.append((steps[-1], "last step of a widened (LSTM-like) stream: the rest of its "
                                   "state (h_L) is never computed; it runs exact backprop"))
        steps = steps[:-1]
        L -= 1
        if L == 0:
            return stream, []
    wide = []
    for l in range(L):
        step, nxt = steps[l], heads[l + 1]
        states = (step.stream, *heads[l].outputs)
        residual = tuple(sorted(set(step.residual) | set(nxt.nodes), key=index.pos.__getitem__))
        inside = set(residual)
        leaves = sorted({i for n in residual for i in n.all_input_nodes
                         if i not in inside and i not in states}, key=index.pos.__getitem__)
        zs = tuple(z for z in leaves if any(index.depends_on(z, s) for s in states))
        if not any(_has_heavy_op(z, s, index) for z in zs for s in states):
            return stream, []
        caps = tuple(c for c in leaves if c not in zs)
        wide.append(ResidualStep(step.node, step.stream, zs, f"{step.kind}, state widened to "
                                 f"{1 + len(nxt.outputs)} tensors (LSTM-like)", residual, caps,
                                 tuple(heads[l].outputs), tuple(nxt.outputs)))
    return Stream(wide), dropped
