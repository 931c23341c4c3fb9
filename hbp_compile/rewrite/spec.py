"""What the rewritten graph hands HighwayStream: a stream, its groups of blocks, their functions.

Static data only (built by replace.build_spec, read by the backward): the graph modules each
group runs, which captures each block reads, and how the forward and backward are split.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch.fx as fx

from .partition import Partition


@dataclasses.dataclass
class CaptureSpec:
    """A batched group's capture function (analysis.captures): differentiated in the final VJP."""

    fn: fx.GraphModule                  # (*leaves) -> (*values), one member's
    leaf_caps: tuple[tuple[int, ...], ...]   # per member, its leaves as indices into caps
    shared: tuple[bool, ...]            # per leaf: one value for all members
    outputs: tuple[tuple, ...]          # per value: its ("cap" | "rcap", j) positions
    fn_ops: int = 0                     # for the report
    sources: tuple = ()                 # per leaf: (src cap index, dim, index per member) or None

    def positions(self, kind: str) -> set:
        """The capture positions of one kind ("cap" or "rcap") that hold the function's values:
        their gradients go on to its inputs, not to the captured nodes."""
        return {j for pos in self.outputs for k, j in pos if k == kind}


@dataclasses.dataclass
class GroupSpec:
    """How the backward runs one group of identical blocks."""

    template: fx.GraphModule            # (x, *caps, *randoms) -> (*zs, *side_outputs)
    members: tuple[int, ...]            # block positions l
    shared: tuple[bool, ...]            # per capture: one value for all members
    batched: bool                       # one vmapped VJP per round (else one VJP per member)
    side_differentiable: tuple[bool, ...]
    n_z: int = 1                        # block outputs the residual function reads
    residual: Optional[fx.GraphModule] = None    # r(x, *zs, *rcaps); None: x + z
    residual_shared: tuple[bool, ...] = ()
    forward: Optional[fx.GraphModule] = None     # (x, *caps) -> (..., *randoms): draws them
    n_random: int = 0                   # random draws per block (dropout masks), saved
    partition: Optional[Partition] = None        # saving fw / bw; None: recompute in backward
    draw: Optional[fx.GraphModule] = None        # (x, *caps) -> randoms, for a partitioned fw
    capture: Optional[CaptureSpec] = None        # batched only
    residual_forward: Optional[fx.GraphModule] = None  # r as the forward runs it (post-LN)
    shortcut: int = -1                  # zs[shortcut] is a projection shortcut P(x) (K dense)
    shortcut_fn: Optional[fx.GraphModule] = None       # (x, *caps, *randoms) -> P(x)

    def n_saved_per_block(self) -> int:
        """Tensors the forward saves per block: the partition's, and the zs that r reads."""
        if self.partition is None:
            return 0
        return self.partition.n_saved + (self.n_z if self.residual is not None else 0)


@dataclasses.dataclass
class StreamSpec:
    """Static description of one stream; lives in the rewritten graph as a closure."""

    name: str
    length: int                          # L
    block_group: tuple[int, ...]         # group index of block l
    block_caps: tuple[tuple[int, ...], ...]   # block l's captures, as indices into caps
    groups: tuple[GroupSpec, ...]
    state_outputs: tuple[tuple[int, int], ...]   # (l, component) returned; all of x_L always
    iters: int
    gamma: float
    mutated_caps: frozenset = frozenset()  # captures the graph writes to later (copy_)
    scan: str = "log-depth"              # "sequential" or "log-depth" (scan.choose_scan)
    width: int = 1                       # components of x_l (2 for an LSTM's (c, h))
    residual_caps: tuple = ()            # block l's residual-function captures (indices)

    @property
    def identity(self) -> bool:
        """Every step is x + z: K = I and the scan is a reverse cumsum."""
        return all(g.residual is None for g in self.groups)

    @property
    def projections(self) -> frozenset:
        """Steps l with a projection shortcut: K_l is dense (the shortcut's VJP), and x_{l+1}
        may have another shape than x_l."""
        return frozenset(l for l in range(self.length)
                         if self.groups[self.block_group[l]].shortcut >= 0)

    def rcaps_of(self, l: int) -> tuple:
        return self.residual_caps[l] if self.residual_caps else ()

    def side_layout(self):
        """(block, side-output index, differentiable) for every returned side output."""
        return [(l, i, d) for l in range(self.length)
                for i, d in enumerate(self.groups[self.block_group[l]].side_differentiable)]
