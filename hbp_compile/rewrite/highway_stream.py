"""The HighwayStream autograd.Function: a stream's forward as before, its backward Highway-BP.

AOTAutograd traces this Function's backward into the joint graph, so the backward graph that
Inductor (and compiled autograd) receives IS the Highway-BP backward:

    round 0   g^0 = scan(K, e)                       residual path only
    round r   v_l = J_l^T g^{r-1}_{l+1} for all l    one batched VJP per group of blocks
              g^r = scan(K, v + gamma K g^{r-1}_{+1} + e)
    final     parameter gradients of block l = its VJP at g^k_{l+1};  dL/dx_0 = g^k_0

scan(K, a) solves g_l = (1 - gamma) K_l g_{l+1} + a_l: a reverse cumsum when every step is
x + z (K = I), a diagonal linear scan otherwise (K_l = dr/dx_l, read off r's VJP at ones).
Tensors along the stream are stacked on a leading axis: E, A and G are (L + 1, *x.shape) with
row l holding the value at x_l. A widened state (an LSTM's x_l = (c_l, h_l), m components) adds a
component axis: (L + 1, m, *x.shape), and K_l is an m x m matrix per coordinate.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import torch
import torch.fx as fx

from ..analysis.batching import vmappable
from ..report import describe
from .batch import run_batched
from .partition import Partition
from .scan import reverse_matrix_scan, reverse_matrix_scan_sequential, reverse_scan

try:                                    # node annotations, to find each VJP in the graphs
    from torch.fx.traceback import annotate as _annotate
except ImportError:                     # pragma: no cover - older torch
    _annotate = None


def annotate(**tags):
    """Tag the nodes traced inside with node.meta["custom"] = tags (no-op where unsupported)."""
    return _annotate(tags) if _annotate is not None else contextlib.nullcontext()


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


# Past this many tensors a stack is one opaque op (rnn_ops.stack: Inductor would emit one copy
# kernel per tensor, and the backward's compile time would grow with the stream's length).
OPAQUE_STACK = 32


def stack(tensors) -> torch.Tensor:
    """torch.stack along a new dim 0, as one op when there are many tensors."""
    tensors = list(tensors)
    if len(tensors) > OPAQUE_STACK:
        from .. import rnn_ops                      # noqa: F401 - registers torch.ops.hbp.*
        return torch.ops.hbp.stack(tensors)
    return torch.stack(tensors)


def _rows(t: torch.Tensor, idx) -> torch.Tensor:
    """t[idx] along dim 0: a strided slice for arithmetic progressions, a stack otherwise."""
    idx = list(idx)
    if len(idx) == 1:
        return t[idx[0]].unsqueeze(0)
    step = idx[1] - idx[0]
    if step > 0 and all(b - a == step for a, b in zip(idx, idx[1:])):
        return t[idx[0]: idx[-1] + 1: step]
    return stack([t[i] for i in idx])


def _blocks_to_stream(parts, length: int, fill: torch.Tensor) -> torch.Tensor:
    """Scatter per-group rows (members, (n, *x.shape)) into a (length + 1, *x.shape) tensor."""
    if len(parts) == 1 and list(parts[0][0]) == list(range(length)):
        return torch.cat([parts[0][1], fill.unsqueeze(0)])
    rows = [None] * (length + 1)
    for members, t in parts:
        for i, l in enumerate(members):
            rows[l] = t[i]
    return stack([fill if r is None else r for r in rows])


def _stack_args(values_of, members, shared, caps):
    """Per argument position: one value for all members (shared, non-tensor) or a stack."""
    first = values_of(members[0])
    args, dims = [], []
    for j, i in enumerate(first):
        one = (shared[j] if j < len(shared) else False) or not isinstance(caps[i], torch.Tensor)
        args.append(caps[i] if one else stack([caps[values_of(l)[j]] for l in members]))
        dims.append(None if one else 0)
    return args, dims


def _linearize(fn, primals, full, diff, m: int):
    """vjp of fn(*primals, *full) in the primals and the `diff` positions of full."""
    def f(*args):
        rest = list(full)
        for j, t in zip(diff, args[m:]):
            rest[j] = t
        return fn(*args[:m], *rest)
    return torch.func.vjp(f, *primals, *[full[j] for j in diff])


def _k_of(rfn, y, m: int, dim: int = 1):
    """K = dr/dx per coordinate: (n, *x) for one component, (n, m, m, *x) for m
    (dim: where the component axes go, after the members' axis or without one)."""
    if m == 1:
        return rfn(torch.ones_like(y))[0]
    rows = []
    for j in range(m):                    # row j: d r_j / d x_i for every i
        cot = tuple(torch.ones_like(t) if i == j else torch.zeros_like(t)
                    for i, t in enumerate(y))
        rows.append(torch.stack(rfn(cot)[:m], dim))
    return torch.stack(rows, dim)


def _wanted(index, caps, needs_grad) -> list[int]:
    """Capture positions of a block to differentiate: float tensors some member needs."""
    if not index[0]:
        return []
    return [j for j in range(len(index[0]))
            if isinstance(caps[index[0][j]], torch.Tensor)
            and caps[index[0][j]].dtype.is_floating_point
            and any(needs_grad[ix[j]] for ix in index)]


class _GroupVJP:
    """The linearised blocks (and residual functions) of one group: one vjp_fn when batched.

    With a partition, each vjp_fn is the group's saved-activation backward (no forward is
    recomputed); without one (recompute=True, or a template that could not be split) it is
    torch.func.vjp of the template, which re-runs the block's forward in the backward."""

    def __init__(self, spec: StreamSpec, gi: int, xs, caps, randoms, saved, needs_grad):
        g = spec.groups[gi]
        self.group, self.members = g, list(g.members)
        self.cap_index = [spec.block_caps[l] for l in self.members]
        self.rcap_index = [spec.rcaps_of(l) for l in self.members]
        self.diff = _wanted(self.cap_index, caps, needs_grad)
        self.rdiff = _wanted(self.rcap_index, caps, needs_grad)
        self.out_diff = list(range(g.n_z)) + \
            [g.n_z + i for i, d in enumerate(g.side_differentiable) if d]
        self.m = spec.width
        self.shared, self.rshared = (), ()
        if g.partition is not None:
            zs = self._from_saved(spec, xs, caps, randoms, saved, gi)
        else:
            zs = self._recomputed(spec, xs, caps, randoms)
        outs = g.template.graph.output_node().args[0]
        self.z_dtypes = [o.meta["val"].dtype for o in outs[:g.n_z]]
        if g.residual is not None:
            self._linearize_residual(spec, xs, caps, zs)
        if g.shortcut >= 0:
            self._linearize_shortcut(spec, xs, caps, randoms, zs)

    def _member_args(self, spec, l, xs, caps, randoms):
        return [*xs[l], *[caps[i] for i in spec.block_caps[l]], *randoms[l]]

    def _from_saved(self, spec, xs, caps, randoms, saved, gi):
        """vjp_fns that run the partition's backward on the activations the forward saved."""
        g, P, m = self.group, self.group.partition, self.m
        grad_at = {p: i for i, p in enumerate(P.diff)}     # primal position -> bw output
        x_grads = [grad_at[j] for j in range(m)]
        missing = [j for j in self.diff if m + j not in grad_at]
        if missing:                     # an op takes it as a non-differentiable argument
            raise RuntimeError(f"captures {missing} of group {gi} need a gradient that the "
                               f"block's saved-activation backward does not compute")
        cap_grads = [grad_at[m + j] for j in self.diff]
        n_act = P.n_saved
        if not g.batched:
            self.fns, self.pfns = [], []
            for l in self.members:
                args = self._member_args(spec, l, xs, caps, randoms) + list(saved[l][:n_act])

                def fn(cots, args=args):
                    res = P.bw(*args, *cots)
                    return (*[res[i] for i in x_grads], *[res[i] for i in cap_grads])

                def pfn(cots, args=args):
                    res = P.bw_params(*args, *cots)
                    return tuple(res[i - m] for i in cap_grads)
                self.fns.append(fn)
                self.pfns.append(pfn)
            return [saved[l][n_act:] for l in self.members]
        members, n = self.members, len(self.members)
        full, dims = _stack_args(lambda l: spec.block_caps[l], members, g.shared, caps)
        self.shared = [d is None for d in dims]
        args = [stack([xs[l][j] for l in members]) for j in range(m)] + full
        args += [stack([randoms[l][j] for l in members]) for j in range(g.n_random)]
        args += [stack([saved[l][j] for l in members]) for j in range(n_act)]
        flags = [True] * m + [d is not None for d in dims] + [True] * (g.n_random + n_act)
        self.X = args[:m]

        def run(bw, cots, offset):
            # a shared weight's gradient is the sum over members, reduced inside the run
            summed = [i - offset for j, i in zip(self.diff, cap_grads) if self.shared[j]]
            res, batched = run_batched(bw, [*args, *cots], [*flags, *[True] * len(cots)],
                                       summed)
            return [r if b or i in summed else r.expand(n, *r.shape)
                    for i, (r, b) in enumerate(zip(res, batched))]

        def fn(cots):
            res = run(P.bw, cots, 0)
            return (*[res[i] for i in x_grads], *[res[i] for i in cap_grads])

        def pfn(cots):
            res = run(P.bw_params, cots, m)
            return tuple(res[i - m] for i in cap_grads)
        self.fns, self.pfns = [fn], [pfn]
        return [stack([saved[l][n_act + j] for l in members]) for j in range(g.n_z)] \
            if g.residual is not None else [None] * g.n_z

    def _recomputed(self, spec, xs, caps, randoms):
        """vjp_fns of torch.func.vjp over the template: its forward runs again here."""
        g, m = self.group, self.m

        def select(outs):
            return tuple(outs[i] for i in self.out_diff)

        if g.batched:
            full, dims = _stack_args(lambda l: spec.block_caps[l], self.members, g.shared, caps)
            for j in range(g.n_random):          # each member's own draws, stacked
                full.append(stack([randoms[l][j] for l in self.members]))
                dims.append(0)
            self.shared = [d is None for d in dims]
            block = torch.func.vmap(vmappable(g.template), in_dims=(*[0] * m, *dims))
            self.X = [stack([xs[l][j] for l in self.members]) for j in range(m)]
            outs, fn = _linearize(lambda *a: select(block(*a)), self.X, full, self.diff, m)
            self.fns = [fn]
            self.pfns = [lambda cots: fn(cots)[m:]]
            return list(outs[:g.n_z])
        self.fns, zs = [], []
        for l, bc in zip(self.members, self.cap_index):
            outs, fn = _linearize(lambda *a: select(g.template(*a)), xs[l],
                                  [caps[i] for i in bc] + list(randoms[l]), self.diff, m)
            self.fns.append(fn)
            zs.append(outs[:g.n_z])
        self.pfns = [lambda cots, fn=fn: fn(cots)[m:] for fn in self.fns]
        return zs

    def _linearize_residual(self, spec, xs, caps, zs):
        """rfns (r's VJPs in x, the zs and its captures) and K = dr/dx, from saved zs."""
        g, m, n_z = self.group, self.m, self.group.n_z
        diff = list(range(n_z)) + [n_z + j for j in self.rdiff]
        if g.batched:
            rfull, rdims = _stack_args(spec.rcaps_of, self.members, g.residual_shared, caps)
            self.rshared = [d is None for d in rdims]
            r = torch.func.vmap(g.residual, in_dims=(*[0] * m, *([0] * n_z), *rdims))
            y, rfn = _linearize(r, self.X, [*zs, *rfull], diff, m)
            self.rfns = [rfn]
            self.K = _k_of(rfn, y, m)
            return
        self.rfns, Ks = [], []
        for i, (l, rc) in enumerate(zip(self.members, self.rcap_index)):
            y, rfn = _linearize(g.residual, xs[l], [*zs[i], *[caps[c] for c in rc]], diff, m)
            self.rfns.append(rfn)
            Ks.append(_k_of(rfn, y, m, dim=0))
        self.K = stack(Ks)

    def _linearize_shortcut(self, spec, xs, caps, randoms, zs):
        """Per member, K_l^T = (dr/dp dP/dx)^T as two VJPs: r's in p, the shortcut's in x (its
        forward, a 1x1 convolution and a norm, runs once more here)."""
        g, j = self.group, self.group.shortcut
        self.kts = {}
        for i, l in enumerate(self.members):
            z_i = [z[i] for z in zs] if g.batched else list(zs[i])
            rc = [caps[c] for c in spec.rcaps_of(l)]
            bc = [caps[c] for c in spec.block_caps[l]]

            def r_of_p(p, z_i=z_i, rc=rc, x=xs[l]):
                return g.residual(*x, *z_i[:j], p, *z_i[j + 1:], *rc)

            _, rfn = torch.func.vjp(r_of_p, z_i[j])
            _, pfn = torch.func.vjp(lambda x, bc=bc, rnd=randoms[l]: g.shortcut_fn(x, *bc, *rnd),
                                    xs[l][0])
            self.kts[l] = (rfn, pfn, z_i[j].dtype)

    def k_t(self, l: int, v: torch.Tensor) -> torch.Tensor:
        """K_l^T v at the projection step l."""
        rfn, pfn, dtype = self.kts[l]
        (cot_p,) = rfn(v)
        (kg,) = pfn(cot_p.to(dtype))
        return kg

    def __call__(self, cot_y: torch.Tensor, cot_sides: list[torch.Tensor], final=False, **tags):
        """VJPs of every member at the stacked stream cotangents g_{l+1} (n, ...).

        Returns (input grads (n, ...), per vjp_fn its capture grads, per vjp_fn its residual
        capture grads); the final call returns no input grads (None) and needs none."""
        gi, n_z, m = tags["hbp_group"], self.group.n_z, self.m
        batched = self.group.batched
        out_x, out_caps, out_rcaps = [], [], []
        for i, fn in enumerate(self.pfns if final else self.fns):
            with annotate(**tags, hbp_call=f"{gi}" if batched else f"{gi}.{i}"):
                cy = cot_y if batched else cot_y[i]
                if m > 1:                          # (.., m, *x) -> one cotangent per component
                    cy = tuple(cy.unbind(1 if batched else 0))
                if self.group.residual is not None:
                    rres = self.rfns[i](cy)
                    cot_zs, rgrads = list(rres[m:m + n_z]), rres[m + n_z:]
                else:
                    cot_zs, rgrads = [cy], ()
                cot_zs = [c.to(dt) for c, dt in zip(cot_zs, self.z_dtypes)]
                if self.group.shortcut >= 0 and not final:   # the scan takes P's path (k_t)
                    j = self.group.shortcut
                    cot_zs[j] = torch.zeros_like(cot_zs[j])
                sides = cot_sides if batched else [c[i] for c in cot_sides]
                res = fn(tuple(cot_zs + sides))
            out_rcaps.append(rgrads)
            if final:
                out_caps.append(res)
                continue
            out_x.append(res[0] if m == 1 else torch.stack(res[:m], 1 if batched else 0))
            out_caps.append(res[m:])
        v = None if final else out_x[0] if batched else stack(out_x)
        return v, out_caps, out_rcaps


def _accumulate_grads(vjp, per_fn, index, shared, diff, accumulate, skip=()):
    """Unstack one group's capture gradients into the per-capture sums (not those in skip:
    values of the capture function, whose gradients go on to its inputs)."""
    if vjp.group.batched:
        for j, gj in zip(diff, per_fn[0]):
            if j in skip:
                continue
            if shared[j]:                  # vmap's VJP already summed over members
                accumulate(index[0][j], gj)
            else:
                for i, ix in enumerate(index):
                    accumulate(ix[j], gj[i])
    else:
        for ix, gs in zip(index, per_fn):
            for j, gj in zip(diff, gs):
                accumulate(ix[j], gj)


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


def _capture_vjp(vjp, cs: CaptureSpec, cap_grads, rcap_grads, caps, needs_grad, accumulate):
    """Gradients of the capture function's inputs from its values' stacked cotangents: one
    VJP of the function vmapped over the members (a GRU's dW_ih as one matmul over T x B)."""
    members = vjp.members
    cots = []
    for pos in cs.outputs:             # a value captured twice (block and r) sums both
        parts = [grads[diff.index(j)] for kind, j in pos
                 for diff, grads in ((vjp.diff, cap_grads) if kind == "cap"
                                     else (vjp.rdiff, rcap_grads),) if j in diff]
        cots.append(sum(parts[1:], parts[0]) if parts else None)
    wanted = _wanted(cs.leaf_caps, caps, needs_grad)
    if not wanted or all(c is None for c in cots):
        return
    leaves, dims = _stack_args(lambda l: cs.leaf_caps[members.index(l)], members, cs.shared,
                               caps)
    fn = torch.func.vmap(vmappable(cs.fn), in_dims=tuple(dims))
    values, vjp_fn = _linearize(fn, [], leaves, wanted, 0)
    cots = [torch.zeros_like(v) if c is None else c.to(v.dtype) for c, v in zip(cots, values)]
    for i, g in zip(wanted, vjp_fn(tuple(cots))):
        source = cs.sources[i] if cs.sources else None
        if cs.shared[i]:                # vmap's VJP summed it over the members
            accumulate(cs.leaf_caps[0][i], g)
        elif source is not None and needs_grad[source[0]]:
            accumulate(source[0], _scatter_rows(g, caps[source[0]], *source[1:]))
        else:
            for k, ix in enumerate(cs.leaf_caps):
                accumulate(ix[i], g[k])


def _scatter_rows(g: torch.Tensor, src: torch.Tensor, dim: int, index) -> torch.Tensor:
    """The gradient of src from those of its slices src.select(dim, index[k]) stacked in g."""
    g = g.movedim(0, dim)
    if list(index) == list(range(src.shape[dim])):
        return g                        # every slice, in order: the stack is the gradient
    rows = torch.tensor(index, device=g.device)
    return src.new_zeros(src.shape, dtype=g.dtype).index_add(dim, rows, g)


def _per_position(spec: StreamSpec, xs, inject, vjps, decay: float):
    """rows, scan and assemble for a stream whose states change shape at projection steps:
    g_l is one tensor per position, and the scan runs position by position (a ResNet's
    stream is tens of blocks long). A projection step's dense K_l^T is the shortcut's VJP
    (_GroupVJP.k_t), applied in the scan as a sequential step."""
    L = spec.length
    K = [None] * L                                   # diagonal K_l; None: the identity
    dense = {}                                       # projection step l -> its group's VJPs
    for v in vjps:
        if v.group.residual is not None:
            for i, l in enumerate(v.members):
                K[l] = v.K[i]
        if v.group.shortcut >= 0:
            dense.update({l: v for l in v.members})

    def k_t(l, g):
        return dense[l].k_t(l, g) if l in dense else g if K[l] is None else K[l] * g
    e = [inject[l][0] if inject[l][0] is not None else torch.zeros_like(xs[l][0])
         for l in range(L)] + [inject[L][0]]

    def rows(G, idx):
        return stack([G[l] for l in idx])

    def assemble(parts, G=None):
        """A_l = e_l + the block VJPs at l (+ gamma K_l g_{l+1} of the last round)."""
        A = list(e)
        for members, v in parts:
            for i, l in enumerate(members):
                A[l] = A[l] + v[i].to(A[l].dtype)
        if spec.gamma and G is not None:
            for l in range(L):
                A[l] = A[l] + spec.gamma * k_t(l, G[l + 1])
        return A

    def scan(A):
        """g_l = (1 - gamma) K_l^T g_{l+1} + A_l, from g_L = A_L down."""
        G = [None] * L + [A[L]]
        for l in reversed(range(L)):
            kg = k_t(l, G[l + 1])
            G[l] = A[l] + (kg if decay == 1.0 else decay * kg)
        return G

    return rows, scan, assemble


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
        ctx.spec = spec
        # A buffer that the graph overwrites after this call (BatchNorm's running statistics)
        # is saved as a copy: the backward re-runs the blocks on the values they saw.
        tensor_caps = [c.clone() if i in spec.mutated_caps else c
                       for i, c in enumerate(caps) if isinstance(c, torch.Tensor)]
        ctx.cap_is_tensor = [isinstance(c, torch.Tensor) for c in caps]
        ctx.other_caps = [c for c in caps if not isinstance(c, torch.Tensor)]
        ctx.n_tensor_caps = len(tensor_caps)
        ctx.save_for_backward(*[t for x in xs[:-1] for t in x], *randoms, *tensor_caps, *saved)
        ctx.mark_non_differentiable(*[s for s, (_, _, d) in zip(sides, spec.side_layout()) if not d])
        return tuple(xs[l][j] for l, j in spec.state_outputs) + tuple(sides)

    @staticmethod
    def _backward(ctx, *grads):
        spec, L, m = ctx.spec, ctx.spec.length, ctx.spec.width
        saved = ctx.saved_tensors
        xs = [tuple(saved[l * m:(l + 1) * m]) for l in range(L)]      # x_l, its m components
        drawn, randoms = iter(saved[L * m:]), []
        for l in range(L):
            randoms.append([next(drawn) for _ in range(spec.groups[spec.block_group[l]].n_random)])
        first_cap = L * m + sum(map(len, randoms))
        tensor_caps = iter(saved[first_cap:first_cap + ctx.n_tensor_caps])
        kept = iter(saved[first_cap + ctx.n_tensor_caps:])
        activations = [[next(kept) for _ in range(spec.groups[spec.block_group[l]]
                                                   .n_saved_per_block())] for l in range(L)]
        other = iter(ctx.other_caps)
        caps = [next(tensor_caps) if t else next(other) for t in ctx.cap_is_tensor]
        needs_grad = ctx.needs_input_grad[1 + m:]
        n_states = len(spec.state_outputs)
        x0 = xs[0][0]

        def component_rows(values):
            """m per-component tensors (None: 0) -> one row (*x) or (m, *x)."""
            rows = [torch.zeros_like(x0) if v is None else v.to(x0.dtype) for v in values]
            return rows[0] if m == 1 else torch.stack(rows)

        zero = component_rows([None] * m)

        # e_l: gradients injected at x_l from outside the stream (x_L's is the incoming one)
        inject = [[None] * m for _ in range(L + 1)]
        for (l, j), g in zip(spec.state_outputs, grads[:n_states]):
            inject[l][j] = g
        # Most streams take gradients at x_L only: E is then never built, a stream-sized
        # buffer less per round (rows without a block VJP are filled with e_L instead)
        only_last = all(v is None for e in inject[:L] for v in e)
        e_last = component_rows(inject[L])

        def injections():
            return stack([component_rows(e) for e in inject])        # (L+1, [m,] *x)
        E = None if only_last else injections()

        # side-output cotangents, per group, stacked over members
        side_cot = {}
        for (l, i, d), g in zip(spec.side_layout(), grads[n_states:]):
            if d:
                side_cot.setdefault(l, []).append(g)

        vjps = [_GroupVJP(spec, gi, xs, caps, randoms, activations, needs_grad)
                for gi in range(len(spec.groups))]

        def group_cotangents(G, vjp):
            cot_y = rows(G, [l + 1 for l in vjp.members])
            n_sides = len(vjp.out_diff) - vjp.group.n_z
            cot_s = [stack([side_cot[l][i] for l in vjp.members]) for i in range(n_sides)]
            return cot_y, cot_s

        decay = 1.0 - spec.gamma
        rows = _rows
        if spec.projections:            # states of several shapes: one tensor per position
            rows, scan, assemble = _per_position(spec, xs, inject, vjps, decay)
        elif spec.identity:
            K = None

            def scan(A):                # a sequential reverse sum is L fused adds (aten's
                return reverse_scan(A, decay, spec.scan)    # cumsum along dim 0 is slow)
        elif m == 1:                    # K_l = dr/dx_l, (L, *x.shape); 1 for x + z steps
            one = torch.ones_like(x0)
            K = _blocks_to_stream([(v.members, v.K) for v in vjps if v.group.residual is not None],
                                  L, one)[:L]

            def scan(A):
                return reverse_scan(A, decay * K, spec.scan)
        else:                           # widened: K_l is m x m per coordinate, (L, m, m, *x)
            K = _blocks_to_stream([(v.members, v.K) for v in vjps], L, vjps[0].K[0])[:L]
            matrix_scan = reverse_matrix_scan_sequential if spec.scan == "sequential" \
                else reverse_matrix_scan

            def scan(A):
                return matrix_scan(A, decay * K)

        with annotate(hbp_stream=spec.name, hbp_scan=0):
            if spec.projections:
                G = scan(assemble([]))
            elif only_last and K is None and decay == 1.0:      # every g^0_l is e_L
                G = e_last.unsqueeze(0).expand(L + 1, *e_last.shape)
            else:
                G = scan(E if E is not None else injections())
        for r in range(1, spec.iters + 1):
            parts = []
            for gi, vjp in enumerate(vjps):
                cot_y, cot_s = group_cotangents(G, vjp)
                v, _, _ = vjp(cot_y, cot_s, hbp_stream=spec.name, hbp_round=r, hbp_group=gi)
                parts.append((vjp.members, v))
            if spec.projections:
                with annotate(hbp_stream=spec.name, hbp_scan=r):
                    G = scan(assemble(parts, G))
                continue
            A = _blocks_to_stream(parts, L, e_last) if E is None else \
                _blocks_to_stream(parts, L, zero) + E
            if spec.gamma:                                       # gamma split: + gamma K g_{l+1}
                kg = G[1:] if K is None else K * G[1:] if m == 1 else \
                    (K * G[1:].unsqueeze(2)).sum(1)                  # K_l^T g_{l+1}
                A = A + spec.gamma * torch.cat([kg, zero.unsqueeze(0)])
            with annotate(hbp_stream=spec.name, hbp_scan=r):
                G = scan(A)

        cap_grads: list[Optional[torch.Tensor]] = [None] * len(caps)

        def accumulate(i, g):
            cap_grads[i] = g if cap_grads[i] is None else cap_grads[i] + g

        for gi, vjp in enumerate(vjps):                         # final: parameter VJPs
            if not vjp.diff and not vjp.rdiff:
                continue
            cot_y, cot_s = group_cotangents(G, vjp)
            _, per, rper = vjp(cot_y, cot_s, final=True, hbp_stream=spec.name,
                               hbp_round="final", hbp_group=gi)
            cs = vjp.group.capture
            _accumulate_grads(vjp, per, vjp.cap_index, vjp.shared, vjp.diff, accumulate,
                              cs.positions("cap") if cs is not None else ())
            if vjp.rdiff:
                _accumulate_grads(vjp, rper, vjp.rcap_index, vjp.rshared, vjp.rdiff, accumulate,
                                  cs.positions("rcap") if cs is not None else ())
            if cs is not None:
                with annotate(hbp_stream=spec.name, hbp_capture=gi):
                    _capture_vjp(vjp, cs, per[0], rper[0], caps, needs_grad, accumulate)
        for i, need in enumerate(needs_grad):
            if not need:
                cap_grads[i] = None
        g0 = [G[0]] if m == 1 else list(G[0].unbind(0))
        g0 = [g if need else None for g, need in zip(g0, ctx.needs_input_grad[1:1 + m])]
        return (None, *g0, *cap_grads)
