"""Find residual streams: maximal chains x_0 -> x_1 -> ... -> x_L of residual steps."""
from __future__ import annotations

import dataclasses

import torch.fx as fx

from .rules import GraphIndex, ResidualStep, match_residual_step, projection_residual


@dataclasses.dataclass
class Stream:
    """A chain of residual steps; steps[l] computes x_{l+1} from x_l."""

    steps: list[ResidualStep]

    @property
    def x0(self) -> fx.Node:
        return self.steps[0].stream

    def __len__(self):
        return len(self.steps)


def find_residual_steps(graph: fx.Graph, index: GraphIndex) -> list[ResidualStep]:
    """Every node that a residual-function rule recognises, in graph order.

    A projection step is matched where its x_l is an earlier step's output; one whose output
    starts a chain of steps is matched as the chain's first step too (ResNet-50's first block
    projects the stem's output)."""
    steps = []
    for node in graph.nodes:
        step = match_residual_step(node, index)
        if step is not None:
            steps.append(step)
            index.step_outputs.add(step.node)
    starts = [s.stream for s in steps if s.stream not in index.step_outputs]
    while starts:
        found = [p for p in (projection_residual(n, index, starts_stream=True)
                             for n in dict.fromkeys(starts)) if p is not None]
        steps += found
        index.step_outputs.update(p.node for p in found)
        starts = [p.stream for p in found if p.stream not in index.step_outputs]
    return sorted(steps, key=lambda s: index.pos[s.node])


def _shape_of(step: ResidualStep) -> tuple:
    """The residual function's ops, to keep a stream's last step like the ones before it."""
    return tuple(n.target for n in step.residual)


def find_streams(graph: fx.Graph, index: GraphIndex) -> tuple[list[Stream], list[ResidualStep]]:
    """Link residual steps into streams, longest first; also return the steps left unlinked.

    A stream value read by several residual steps (a block that contains its own residual add,
    two branches forking from one state, relu(x + z) around its own x + z) continues along the
    step whose output is itself a stream value, the last such in graph order: the outermost.
    At the stream's end nothing continues; there the step shaped like the previous one wins,
    so that pointwise ops of the head (tanh(x_L)) or half of a GRU update (z * h) are not
    taken for the last residual function.
    """
    steps = find_residual_steps(graph, index)
    by_stream: dict[fx.Node, list[ResidualStep]] = {}
    for step in steps:
        by_stream.setdefault(step.stream, []).append(step)
    successor = {}
    for x, candidates in by_stream.items():
        continuing = [c for c in candidates if c.node in by_stream]
        if continuing:
            successor[x] = continuing[-1]
    produced = {s.node for s in successor.values()}
    streams = []
    for x0 in by_stream:
        if x0 in produced:
            continue                        # not the first state of its chain
        chain, x = [], x0
        while x in by_stream:
            step = successor.get(x)
            if step is None:                # the last step: like the one before, else outermost
                candidates = by_stream[x]
                alike = [c for c in candidates if chain and _shape_of(c) == _shape_of(chain[-1])]
                step = (alike or candidates)[-1]
            chain.append(step)
            x = step.node
        streams.append(Stream(chain))
    streams.sort(key=lambda s: (-len(s), index.pos[s.x0]))
    linked = {s for st in streams for s in st.steps}
    # steps nested in a linked step's residual function (the add of relu(x + z)) or wrapping
    # one (the head's tanh(x_L + z)) are not steps of their own
    inside = {n for s in linked for n in s.residual}
    linked_nodes = {s.node for s in linked}
    unlinked = [s for s in steps if s not in linked and s.node not in inside
                and not any(n in linked_nodes for n in s.residual)]
    return streams, unlinked
