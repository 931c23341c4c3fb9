"""Find residual streams: maximal chains x_0 -> x_1 -> ... -> x_L of residual steps."""
from __future__ import annotations

import dataclasses

import torch.fx as fx

from .rules import GraphIndex, ResidualStep, match_residual_step


@dataclasses.dataclass
class Stream:
    """A chain of residual steps; steps[l] computes x_{l+1} from x_l."""

    steps: list[ResidualStep]

    @property
    def x0(self) -> fx.Node:
        return self.steps[0].stream

    @property
    def states(self) -> list[fx.Node]:
        """x_0, ..., x_L."""
        return [self.x0] + [s.node for s in self.steps]

    def __len__(self):
        return len(self.steps)


def find_residual_steps(graph: fx.Graph, index: GraphIndex) -> list[ResidualStep]:
    """Every node that a residual-function rule recognises, in graph order."""
    steps = []
    for node in graph.nodes:
        step = match_residual_step(node, index)
        if step is not None:
            steps.append(step)
    return steps


def find_streams(graph: fx.Graph, index: GraphIndex) -> tuple[list[Stream], list[ResidualStep]]:
    """Link residual steps into streams, longest first; also return the steps left unlinked.

    A stream value read by several residual steps (a block that contains its own residual add,
    or two branches forking from one state) continues along the LAST of them in graph order:
    it is the outermost step, and the others lie inside its block or read x_l as a side branch.
    """
    steps = find_residual_steps(graph, index)
    successor: dict[fx.Node, ResidualStep] = {}
    for step in steps:                      # graph order: later (outer) steps win
        successor[step.stream] = step
    linked = set(successor.values())
    produced = {s.node for s in linked}
    streams = []
    for step in linked:
        if step.stream in produced:
            continue                        # not the first step of its chain
        chain = [step]
        while chain[-1].node in successor:
            chain.append(successor[chain[-1].node])
        streams.append(Stream(chain))
    streams.sort(key=lambda s: (-len(s), index.pos[s.x0]))
    unlinked = [s for s in steps if s not in linked]
    return streams, unlinked
