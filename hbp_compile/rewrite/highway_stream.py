"""The HighwayStream autograd.Function: a stream's forward as before, its backward Highway-BP.

AOTAutograd traces this Function's backward into the joint graph, so the backward graph that
Inductor (and compiled autograd) receives IS the Highway-BP backward:

    round 0   g^0 = scan(K, e)                       residual path only
    round r   v_l = J_l^T g^{r-1}_{l+1} for all l    one batched VJP per group of blocks
              g^r = scan(K, v + gamma K g^{r-1}_{+1} + e)
    final     parameter gradients of block l = its VJP at g^k_{l+1};  dL/dx_0 = g^k_0

scan(K, a) solves g_l = (1 - gamma) K_l g_{l+1} + a_l: a reverse sum when every step is
x + z (K = I), a diagonal linear scan otherwise (K_l = dr/dx_l, read off r's VJP at ones).
How g is held and scanned (stacked (L + 1, *x.shape), or one tensor per position) is chosen
in scan.stream_scan; the groups' VJPs are group_vjp's. A widened state (an LSTM's
x_l = (c_l, h_l), m components) adds a component axis, and K_l is an m x m matrix per
coordinate.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from ..report import describe
from .group_vjp import annotate, capture_vjp, group_vjp, stack
from .scan import stream_scan
from .spec import GroupSpec, StreamSpec


def _block_forward(group: GroupSpec, x: tuple, block_caps: list):
    """One block's outputs, its random draws, and the activations its backward will read."""
    if group.partition is not None:
        drawn = list(group.draw(*x, *block_caps)) if group.n_random else []
        res = group.partition.fw(*x, *block_caps, *drawn)
        n = group.partition.n_outputs
        return res[:n], drawn, list(res[n:])
    if group.forward is not None:            # draws its random numbers; they are saved
        outs = group.forward(*x, *block_caps)
        cut = len(outs) - group.n_random
        return outs[:cut], list(outs[cut:]), []
    return group.template(*x, *block_caps), [], []


class StreamFailure(Exception):
    """Building one stream's Highway-BP forward or backward failed (while AOTAutograd traces
    it): the backend leaves that stream exact and compiles the rest."""

    def __init__(self, stream: str, cause: Exception):
        super().__init__(f"{stream}: {describe(cause, 200)}")
        self.stream, self.cause = stream, cause


@contextlib.contextmanager
def failures_name(stream: str):
    """Re-raise an exception from building `stream` as StreamFailure(stream)."""
    from torch._dynamo.exc import TorchDynamoException

    try:
        yield
    except (StreamFailure, TorchDynamoException):   # Dynamo's own signals (restarts) pass on
        raise
    except Exception as e:                      # noqa: BLE001 - the backend isolates the stream
        raise StreamFailure(stream, e) from e


class HighwayStream(torch.autograd.Function):
    """x_0 (its m components), captures -> returned states and side outputs; Highway-BP."""

    @staticmethod
    def forward(ctx, spec: StreamSpec, *args):
        with failures_name(spec.name):
            return HighwayStream._forward(ctx, spec, *args)

    @staticmethod
    def backward(ctx, *grads):
        with failures_name(ctx.spec.name):
            return HighwayStream._backward(ctx, *grads)

    @staticmethod
    def _forward(ctx, spec: StreamSpec, *args):
        m = spec.width
        x, caps = tuple(args[:m]), args[m:]
        xs, sides, randoms, saved = [x], [], [], []
        for l in range(spec.length):
            group = spec.groups[spec.block_group[l]]
            block_caps = [caps[i] for i in spec.block_caps[l]]
            outs, drawn, kept = _block_forward(group, x, block_caps)
            randoms.extend(drawn)
            zs = outs[:group.n_z]
            if group.residual is None:
                x = (x[0] + zs[0],)                              # identity residual function
            else:
                r = group.residual_forward or group.residual
                y = r(*x, *zs, *[caps[i] for i in spec.rcaps_of(l)])
                x = (y,) if m == 1 else tuple(y)
                if group.partition is not None:
                    kept = [*kept, *zs]                          # r's VJP reads them
            xs.append(x)
            sides.extend(outs[group.n_z:])
            saved.extend(kept)
        _pack(ctx, spec, xs, randoms, caps, saved)
        ctx.mark_non_differentiable(*[s for s, (_, _, d) in zip(sides, spec.side_layout()) if not d])
        return tuple(xs[l][j] for l, j in spec.state_outputs) + tuple(sides)

    @staticmethod
    def _backward(ctx, *grads):
        """Round 0, k rounds, the final VJPs; the gradients of x_0 and the captures."""
        spec, tags = ctx.spec, dict(hbp_stream=ctx.spec.name)
        xs, randoms, caps, activations = _unpack(ctx)
        needs_grad = ctx.needs_input_grad[1 + spec.width:]
        inject, side_cots = _incoming(spec, grads)
        vjps = [group_vjp(spec, gi, xs, caps, randoms, activations, needs_grad)
                for gi in range(len(spec.groups))]
        path = stream_scan(spec, inject, vjps, xs)
        with annotate(**tags, hbp_scan=0):
            G = path.first()                                     # round 0: residual path only
        latest = [[] for _ in vjps]              # per group: pieces of its latest J^T g
        for r in range(1, spec.iters + 1):                       # round r: J^T g^{r-1}, scan
            parts = [p for gi, v in enumerate(vjps)
                     for p in _round_parts(spec, r, v, path.cotangents(G, v), side_cots[gi],
                                           latest[gi], **tags, hbp_round=r, hbp_group=gi)]
            with annotate(**tags, hbp_scan=r):
                G = path.next(parts, G)
        cap_grads = _final_vjps(spec, vjps, path, G, side_cots, caps, needs_grad)
        g0 = [g if need else None
              for g, need in zip(path.g0(G), ctx.needs_input_grad[1:1 + spec.width])]
        return (None, *g0, *cap_grads)


def needed_blocks(L: int, k: int, r: int) -> range:
    """The blocks whose round-r VJP can change a gradient (gamma = 0). Block l's VJP in round
    r reads g^{r-1}_{l+1}, which has converged from round L - l - 1 on: past l = L - r it gives
    the value it gave the round before. Its result reaches x_0 only through g^r_0..g^r_l, and
    each later round moves it down one position (round r + 1 reads g^r_j at block j - 1), so
    below l = k - r it reaches no g^k_j that the final VJPs or dL/dx_0 read."""
    return range(max(0, k - r), L)


def _round_parts(spec: StreamSpec, r: int, v, cot_y, cot_sides, latest: list, **tags):
    """Group v's share of round r, as (members, J^T g per member) parts: a VJP at its needed
    members that have not converged (one batched call over those rows of its stacks, or one
    call each), the value of an earlier round at the converged ones. Blocks below
    needed_blocks are left out: nothing reads their rows of g^r.

    latest: (first member index, values) pieces, in order, of the latest value of every member
    computed so far (a suffix of the members: the needed ones only ever grow downwards)."""
    n, L, k = len(v.members), spec.length, spec.iters
    if spec.gamma:                  # gamma K g^{r-1} enters every row: nothing converges
        return [(v.members, v(cot_y, cot_sides, **tags)[0])]
    need = needed_blocks(L, k, r)
    known = latest[0][0] if latest else n            # members known..n-1 have a value
    rows = [i for i, l in enumerate(v.members) if l in need and (l <= L - r or i < known)]
    reused = [i for i, l in enumerate(v.members) if l in need and i not in rows]
    parts = []
    if rows:
        assert rows == list(range(rows[0], rows[-1] + 1)), (v.members, rows)
        sel = slice(rows[0], rows[-1] + 1)
        got = v(cot_y, cot_sides, rows=None if len(rows) == n else sel, **tags)[0]
        parts.append((v.members[sel], got))
    if reused:
        parts += [(v.members[i0:i0 + len(vals)], vals) for i0, vals in _from(latest, reused[0])]
    if rows:
        latest[:] = [(rows[0], got)] + _from(latest, rows[-1] + 1)
    return parts


def _from(pieces: list, a: int) -> list:
    """The (first index, values) pieces cut to the indices a and above."""
    return [(max(i0, a), vals[max(0, a - i0):]) for i0, vals in pieces if i0 + len(vals) > a]


def _pack(ctx, spec: StreamSpec, xs, randoms, caps, saved) -> None:
    """Save what the backward reads: x_0..x_{L-1}, the random draws, the tensor captures, the
    activations each block's backward reads (in this order; _unpack reads it back)."""
    # A buffer that the graph overwrites after this call (BatchNorm's running statistics)
    # is saved as a copy: the backward re-runs the blocks on the values they saw.
    tensor_caps = [c.clone() if i in spec.mutated_caps else c
                   for i, c in enumerate(caps) if isinstance(c, torch.Tensor)]
    ctx.spec = spec
    ctx.cap_is_tensor = [isinstance(c, torch.Tensor) for c in caps]
    ctx.other_caps = [c for c in caps if not isinstance(c, torch.Tensor)]
    ctx.n_tensor_caps = len(tensor_caps)
    ctx.save_for_backward(*[t for x in xs[:-1] for t in x], *randoms, *tensor_caps, *saved)


def _unpack(ctx):
    """(xs, randoms, caps, activations) per block, from what _pack saved."""
    spec, L, m = ctx.spec, ctx.spec.length, ctx.spec.width
    saved = iter(ctx.saved_tensors)
    group = [spec.groups[spec.block_group[l]] for l in range(L)]
    xs = [tuple(next(saved) for _ in range(m)) for _ in range(L)]     # x_l, its m components
    randoms = [[next(saved) for _ in range(g.n_random)] for g in group]
    tensor_caps = [next(saved) for _ in range(ctx.n_tensor_caps)]
    activations = [[next(saved) for _ in range(g.n_saved_per_block())] for g in group]
    tensors, other = iter(tensor_caps), iter(ctx.other_caps)
    caps = [next(tensors) if t else next(other) for t in ctx.cap_is_tensor]
    return xs, randoms, caps, activations


def _incoming(spec: StreamSpec, grads):
    """The gradients reaching the stream from outside: inject[l] (m components, None: 0) at
    x_l, x_L's being the incoming one; per group, its members' side-output cotangents."""
    n_states = len(spec.state_outputs)
    inject = [[None] * spec.width for _ in range(spec.length + 1)]
    for (l, j), g in zip(spec.state_outputs, grads[:n_states]):
        inject[l][j] = g
    side_cot: dict = {}
    for (l, i, d), g in zip(spec.side_layout(), grads[n_states:]):
        if d:
            side_cot.setdefault(l, []).append(g)
    side_cots = []
    for g in spec.groups:
        n_sides = sum(g.side_differentiable)
        per_side = [[side_cot[l][i] for l in g.members] for i in range(n_sides)]
        side_cots.append([stack(c) for c in per_side] if g.batched else per_side)
    return inject, side_cots


def _final_vjps(spec: StreamSpec, vjps, path, G, side_cots, caps, needs_grad):
    """Every block's parameter VJP at g^k_{l+1}, summed per capture (None where not needed)."""
    cap_grads: list[Optional[torch.Tensor]] = [None] * len(caps)

    def accumulate(i, g):
        cap_grads[i] = g if cap_grads[i] is None else cap_grads[i] + g

    for gi, vjp in enumerate(vjps):
        if not vjp.diff and not vjp.rdiff:
            continue
        _, per, rper = vjp(path.cotangents(G, vjp), side_cots[gi], final=True,
                           hbp_stream=spec.name, hbp_round="final", hbp_group=gi)
        cs = vjp.group.capture
        for kind, grads in [("cap", per)] + ([("rcap", rper)] if vjp.rdiff else []):
            # what the capture function computes is differentiated through it (capture_vjp)
            vjp.accumulate(grads, kind, accumulate, cs.positions(kind) if cs is not None else ())
        if cs is not None:
            with annotate(hbp_stream=spec.name, hbp_capture=gi):
                capture_vjp(vjp, cs, per[0], rper[0], caps, needs_grad, accumulate)
    return [g if need else None for g, need in zip(cap_grads, needs_grad)]
