"""Swap a stream's nodes in the aten graph for one call of HighwayStream."""
from __future__ import annotations

import copy
import operator

import torch
import torch.fx as fx

from ..analysis.blocks import Block
from ..analysis.groups import Group
from .highway_rnn import RNNSpec, highway_rnn
from .highway_stream import HighwayStream
from .spec import CaptureSpec, GroupSpec, StreamSpec
from ..analysis.ops import device_type  # noqa: F401 - the pass imports it here
from .partition import draws_only
from .scan import choose_matrix_scan, choose_scan

aten = torch.ops.aten


def state_outputs(blocks: list[Block]) -> tuple[tuple[int, int], ...]:
    """(l, component) of the states x_l, l in 1..L, read outside the stream (all of x_L)."""
    L, m = len(blocks), len(blocks[0].xs)
    out = []
    for l in range(1, L):
        inside = set(blocks[l].body) | set(blocks[l].step.residual) | set(blocks[l].step.outputs)
        for j, node in enumerate(blocks[l - 1].step.outputs):
            if any(u not in inside for u in node.users):
                out.append((l, j))
    return tuple(out) + tuple((L, j) for j in range(m))


def build_spec(name: str, blocks: list[Block], groups: list[Group], batched: list[bool],
               iters: int, gamma: float, scan: str = "auto") -> tuple[StreamSpec, list]:
    """The StreamSpec of a stream and the flat list of captured graph values it takes."""
    caps: list = []
    slot: dict = {}

    def slots(values):
        for c in values:
            if c not in slot:
                slot[c] = len(caps)
                caps.append(c)
        return tuple(slot[c] for c in values)

    block_caps = [slots(blk.captures) for blk in blocks]
    residual_caps = [slots(blk.step.residual_caps) for blk in blocks]
    block_group = [0] * len(blocks)
    group_specs = []
    for gi, (g, b) in enumerate(zip(groups, batched)):
        for l in g.members:
            block_group[l] = gi
        capture = None
        if b and g.capture is not None:
            cf = g.capture
            sources = tuple(None if src is None else (slots([src[0]])[0], *src[1:])
                            for src in cf.sources)
            capture = CaptureSpec(cf.gm, tuple(slots(leaves) for leaves in cf.leaves),
                                  tuple(cf.shared), tuple(cf.outputs), cf.n_ops, sources)
        group_specs.append(GroupSpec(
            template=g.template.gm, members=tuple(g.members), shared=tuple(g.shared),
            batched=b, side_differentiable=tuple(blocks[g.members[0]].side_differentiable),
            n_z=g.template.n_z, residual=g.template.residual,
            forward=g.template.forward, n_random=g.template.n_random,
            residual_shared=tuple(g.residual_shared), partition=g.partition,
            draw=draws_only(g.template.forward, g.template.n_random)
            if g.partition is not None and g.template.n_random else None,
            capture=capture, residual_forward=g.template.residual_forward,
            **_shortcut(g.template.gm, blocks[g.members[0]].step.shortcut)))
    mutated = frozenset(i for i, c in enumerate(caps)
                        if any(u.target is aten.copy_.default and u.args[0] is c for u in c.users))
    spec = StreamSpec(name=name, length=len(blocks), block_group=tuple(block_group),
                      block_caps=tuple(block_caps), residual_caps=tuple(residual_caps),
                      groups=tuple(group_specs),
                      state_outputs=state_outputs(blocks), iters=iters, gamma=gamma,
                      mutated_caps=mutated,
                      scan=_scan_form(len(blocks) + 1, device_type(blocks[0].x), scan,
                                      len(blocks[0].xs)),
                      width=len(blocks[0].xs))
    return spec, caps


def _shortcut(template: fx.GraphModule, j: int) -> dict:
    """A projection step's shortcut as its own function: the template with output zs[j] only."""
    if j < 0:
        return {}
    gm = copy.deepcopy(template)
    out = gm.graph.output_node()
    out.args = (out.args[0][j],)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return dict(shortcut=j, shortcut_fn=gm)


def _scan_form(n: int, device: str, scan: str, width: int) -> str:
    """The scan's form for n positions; widened (m x m) states have fewer forms."""
    form = choose_scan(n, device, scan)
    return form if width == 1 else choose_matrix_scan(n, form)


def replace_stream(graph: fx.Graph, spec: StreamSpec, blocks: list[Block], caps: list,
                   renamed: dict) -> fx.Node:
    """Insert `HighwayStream.apply(spec, x0, *caps)` and route every outside reader to it.

    `renamed` maps nodes that an earlier rewrite replaced (a stream whose x_0 is another
    stream's x_L) to their replacements, and is updated with this stream's outputs.
    """
    def resolve(n):
        while isinstance(n, fx.Node) and n in renamed:
            n = renamed[n]
        return n

    def highway_stream(*args):                     # (*x_0 components, *caps)
        return HighwayStream.apply(spec, *args)

    highway_stream.__name__ = highway_stream.__qualname__ = spec.name
    last = blocks[-1].step.node
    with graph.inserting_after(last):
        call = graph.call_function(highway_stream,
                                   (*map(resolve, blocks[0].xs), *map(resolve, caps)))
    call.name = spec.name
    values = [blocks[l - 1].step.outputs[j] for l, j in spec.state_outputs]
    values += [s for blk in blocks for s in blk.side_outputs]
    inside = {n for blk in blocks for n in (*blk.body, *blk.step.residual, *blk.step.outputs)}
    prev = call
    for i, old in enumerate(values):
        with graph.inserting_after(prev):
            new = graph.call_function(operator.getitem, (call, i))
        new.meta["val"] = old.meta.get("val")
        prev = new
        for user in list(old.users):
            if user not in inside and user is not call:
                user.replace_input_with(old, new)
        renamed[old] = new
    return call


def rnn_layer_problem(node: fx.Node) -> str:
    """Why an hbp::rnn_layer node stays exact backprop, or "" when HighwayRNN can take it."""
    mode, x, hx, params, has_biases, train = node.args
    val = x.meta.get("val")
    if mode == "lstm" and len(params) % 2:
        return "LSTM with proj_size (h_t = W_hr (o tanh c_t)): not supported, exact backprop"
    if not isinstance(val, torch.Tensor) or not val.dtype.is_floating_point:
        return "input is not a floating-point tensor"
    if isinstance(val.shape[0], int) and val.shape[0] < 2:   # a symbolic T is >= 2 (Dynamo)
        return "a single time step"
    return ""


def replace_rnn_layer(graph: fx.Graph, node: fx.Node, spec: RNNSpec) -> fx.Node:
    """hbp::rnn_layer(mode, x, hx, params, ...) -> HighwayRNN.apply(spec, x, *hx, *params)."""
    _, x, hx, params, *_ = node.args
    with graph.inserting_before(node):
        call = graph.call_function(highway_rnn(spec), (x, *hx, *params))
    call.meta = dict(node.meta)
    call.name = spec.name
    node.replace_all_uses_with(call)
    graph.erase_node(node)
    return call
