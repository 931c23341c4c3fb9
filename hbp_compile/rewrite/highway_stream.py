"""The HighwayStream autograd.Function: a stream's forward as before, its backward Highway-BP.

AOTAutograd traces this Function's backward into the joint graph, so the backward graph that
Inductor (and compiled autograd) receives IS the Highway-BP backward:

    round 0   g^0 = scan(e)                          residual path only
    round r   v_l = J_l^T g^{r-1}_{l+1} for all l    one batched VJP per group of blocks
              g^r = scan(v + gamma g^{r-1}_{+1} + e)
    final     parameter gradients of block l = its VJP at g^k_{l+1};  dL/dx_0 = g^k_0

Tensors along the stream are stacked on a leading axis: E, A and G are (L + 1, *x.shape) with
row l holding the value at x_l.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import torch
import torch.fx as fx

from ..analysis.batching import vmappable
from .scan import reverse_scan_scalar

try:                                    # node annotations, to find each VJP in the graphs
    from torch.fx.traceback import annotate as _annotate
except ImportError:                     # pragma: no cover - older torch
    _annotate = None


def annotate(**tags):
    """Tag the nodes traced inside with node.meta["custom"] = tags (no-op where unsupported)."""
    return _annotate(tags) if _annotate is not None else contextlib.nullcontext()


@dataclasses.dataclass
class GroupSpec:
    """How the backward runs one group of identical blocks."""

    template: fx.GraphModule            # (x, *caps) -> (z, *side_outputs)
    members: tuple[int, ...]            # block positions l
    shared: tuple[bool, ...]            # per capture: one value for all members
    batched: bool                       # one vmapped VJP per round (else one VJP per member)
    side_differentiable: tuple[bool, ...]


@dataclasses.dataclass
class StreamSpec:
    """Static description of one stream; lives in the rewritten graph as a closure."""

    name: str
    length: int                          # L
    block_group: tuple[int, ...]         # group index of block l
    block_caps: tuple[tuple[int, ...], ...]   # block l's captures, as indices into caps
    groups: tuple[GroupSpec, ...]
    state_outputs: tuple[int, ...]       # stream positions l in 1..L returned (x_L always)
    iters: int
    gamma: float
    mutated_caps: frozenset = frozenset()  # captures the graph writes to later (copy_)

    def side_layout(self):
        """(block, side-output index, differentiable) for every returned side output."""
        return [(l, i, d) for l in range(self.length)
                for i, d in enumerate(self.groups[self.block_group[l]].side_differentiable)]


def _rows(t: torch.Tensor, idx) -> torch.Tensor:
    """t[idx] along dim 0: a strided slice for arithmetic progressions, a stack otherwise."""
    idx = list(idx)
    if len(idx) == 1:
        return t[idx[0]].unsqueeze(0)
    step = idx[1] - idx[0]
    if step > 0 and all(b - a == step for a, b in zip(idx, idx[1:])):
        return t[idx[0]: idx[-1] + 1: step]
    return torch.stack([t[i] for i in idx])


def _blocks_to_stream(parts, length: int, like: torch.Tensor) -> torch.Tensor:
    """Scatter per-group rows (members, (n, *x.shape)) into a (length + 1, *x.shape) tensor."""
    if len(parts) == 1 and list(parts[0][0]) == list(range(length)):
        return torch.cat([parts[0][1], torch.zeros_like(like).unsqueeze(0)])
    rows = [None] * (length + 1)
    for members, t in parts:
        for i, l in enumerate(members):
            rows[l] = t[i]
    zero = torch.zeros_like(like)
    return torch.stack([zero if r is None else r for r in rows])


class _GroupVJP:
    """The linearised blocks of one group: a single vjp_fn when batched, one per member if not."""

    def __init__(self, spec: StreamSpec, gi: int, xs, caps, needs_grad):
        g = spec.groups[gi]
        self.group, self.members = g, list(g.members)
        block_caps = [spec.block_caps[l] for l in self.members]
        ncap = len(block_caps[0])
        first = block_caps[0]
        # per capture position: differentiate it? (any member's capture needs a gradient)
        self.diff = [j for j in range(ncap)
                     if isinstance(caps[first[j]], torch.Tensor)
                     and caps[first[j]].dtype.is_floating_point
                     and any(needs_grad[bc[j]] for bc in block_caps)]
        self.cap_index = block_caps
        self.out_diff = [0] + [1 + i for i, d in enumerate(g.side_differentiable) if d]
        template = g.template

        def select(outs):
            return tuple(outs[i] for i in self.out_diff)

        if g.batched:
            shared = [g.shared[j] or not isinstance(caps[first[j]], torch.Tensor)
                      for j in range(ncap)]
            full = [caps[first[j]] if shared[j] else torch.stack([caps[bc[j]] for bc in block_caps])
                    for j in range(ncap)]
            self.shared = shared
            in_dims = (0, *[None if s else 0 for s in shared])
            batched_template = torch.func.vmap(vmappable(template), in_dims=in_dims)
            X = torch.stack([xs[l] for l in self.members])           # (n, *x.shape)

            def f(X, *diff_caps):
                args = list(full)
                for j, t in zip(self.diff, diff_caps):
                    args[j] = t
                return select(batched_template(X, *args))

            outs, vjp_fn = torch.func.vjp(f, X, *[full[j] for j in self.diff])
            self.fns = [vjp_fn]
        else:
            self.fns = []
            for l, bc in zip(self.members, block_caps):
                args0 = [caps[i] for i in bc]

                def f(x, *diff_caps, args0=args0):
                    args = list(args0)
                    for j, t in zip(self.diff, diff_caps):
                        args[j] = t
                    return select(template(x, *args))

                outs, vjp_fn = torch.func.vjp(f, xs[l], *[args0[j] for j in self.diff])
                self.fns.append(vjp_fn)
        z = outs[0]
        self.z_dtype = z.dtype

    def __call__(self, cot_z: torch.Tensor, cot_sides: list[torch.Tensor], **tags):
        """VJP of every member at stacked cotangents (n, ...): (input grads (n, ...), cap grads)."""
        cot = [cot_z.to(self.z_dtype)] + cot_sides
        gi = tags["hbp_group"]
        if self.group.batched:
            with annotate(**tags, hbp_call=f"{gi}"):
                res = self.fns[0](tuple(cot))
            return res[0], [res[1:]]
        res = []
        for i, fn in enumerate(self.fns):
            with annotate(**tags, hbp_call=f"{gi}.{i}"):
                res.append(fn(tuple(c[i] for c in cot)))
        return torch.stack([r[0] for r in res]), [r[1:] for r in res]


class HighwayStream(torch.autograd.Function):
    """x_0, captures -> returned stream states and side outputs; Highway-BP backward."""

    @staticmethod
    def forward(ctx, spec: StreamSpec, x0: torch.Tensor, *caps):
        x, xs, sides = x0, [x0], []
        for l in range(spec.length):
            group = spec.groups[spec.block_group[l]]
            outs = group.template(x, *[caps[i] for i in spec.block_caps[l]])
            x = x + outs[0]                                  # identity residual function
            xs.append(x)
            sides.extend(outs[1:])
        ctx.spec = spec
        # A buffer that the graph overwrites after this call (BatchNorm's running statistics)
        # is saved as a copy: the backward re-runs the blocks on the values they saw.
        tensor_caps = [c.clone() if i in spec.mutated_caps else c
                       for i, c in enumerate(caps) if isinstance(c, torch.Tensor)]
        ctx.cap_is_tensor = [isinstance(c, torch.Tensor) for c in caps]
        ctx.other_caps = [c for c in caps if not isinstance(c, torch.Tensor)]
        ctx.save_for_backward(*xs[:-1], *tensor_caps)
        ctx.mark_non_differentiable(*[s for s, (_, _, d) in zip(sides, spec.side_layout()) if not d])
        return tuple(xs[l] for l in spec.state_outputs) + tuple(sides)

    @staticmethod
    def backward(ctx, *grads):
        spec, L = ctx.spec, ctx.spec.length
        saved = ctx.saved_tensors
        xs = list(saved[:L])
        tensor_caps, other = iter(saved[L:]), iter(ctx.other_caps)
        caps = [next(tensor_caps) if t else next(other) for t in ctx.cap_is_tensor]
        needs_grad = ctx.needs_input_grad[2:]
        n_states = len(spec.state_outputs)
        x0 = xs[0]

        # e_l: gradients injected at x_l from outside the stream (x_L's is the incoming one)
        inject = [None] * (L + 1)
        for l, g in zip(spec.state_outputs, grads[:n_states]):
            inject[l] = g
        zero = torch.zeros_like(x0)
        E = torch.stack([zero if g is None else g.to(x0.dtype) for g in inject])  # (L+1, *x)

        # side-output cotangents, per group, stacked over members
        side_cot = {}
        for (l, i, d), g in zip(spec.side_layout(), grads[n_states:]):
            if d:
                side_cot.setdefault(l, []).append(g)

        vjps = [_GroupVJP(spec, gi, xs, caps, needs_grad) for gi in range(len(spec.groups))]

        def group_cotangents(G, vjp):
            cot_z = _rows(G, [l + 1 for l in vjp.members])
            cot_s = [torch.stack([side_cot[l][i] for l in vjp.members])
                     for i in range(len(vjp.out_diff) - 1)]
            return cot_z, cot_s

        decay = 1.0 - spec.gamma
        G = reverse_scan_scalar(E, decay)                       # round 0
        for r in range(1, spec.iters + 1):
            parts = []
            for gi, vjp in enumerate(vjps):
                cot_z, cot_s = group_cotangents(G, vjp)
                v, _ = vjp(cot_z, cot_s, hbp_stream=spec.name, hbp_round=r, hbp_group=gi)
                parts.append((vjp.members, v))
            A = _blocks_to_stream(parts, L, x0) + E
            if spec.gamma:                                      # gamma split: + gamma g_{l+1}
                A = A + spec.gamma * torch.cat([G[1:], zero.unsqueeze(0)])
            G = reverse_scan_scalar(A, decay)

        cap_grads: list[Optional[torch.Tensor]] = [None] * len(caps)

        def accumulate(i, g):
            cap_grads[i] = g if cap_grads[i] is None else cap_grads[i] + g

        for gi, vjp in enumerate(vjps):                        # final: parameter VJPs
            if not vjp.diff:
                continue
            cot_z, cot_s = group_cotangents(G, vjp)
            _, per = vjp(cot_z, cot_s, hbp_stream=spec.name, hbp_round="final", hbp_group=gi)
            if vjp.group.batched:
                for j, gj in zip(vjp.diff, per[0]):
                    if vjp.shared[j]:          # vmap's VJP already summed over members
                        accumulate(vjp.cap_index[0][j], gj)
                    else:
                        for i, bc in enumerate(vjp.cap_index):
                            accumulate(bc[j], gj[i])
            else:
                for bc, gs in zip(vjp.cap_index, per):
                    for j, gj in zip(vjp.diff, gs):
                        accumulate(bc[j], gj)
        for i, need in enumerate(needs_grad):
            if not need:
                cap_grads[i] = None
        return (None, G[0] if ctx.needs_input_grad[1] else None, *cap_grads)
