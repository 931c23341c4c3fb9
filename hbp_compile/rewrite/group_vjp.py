"""The linearised blocks of one group: their VJPs at the stream's cotangents, every round.

A group is a set of structurally identical blocks. Two forms run its VJPs:

    BatchedVJP   one vjp_fn over the members stacked on a leading axis (a round is one call)
    MemberVJP    one vjp_fn per member (a round is n calls)

Either form gets its vjp_fns from the activations the forward saved (the group's Partition: no
forward recomputed) or, without a partition (recompute=True, or a template that could not be
split), from torch.func.vjp of the template, which re-runs the block's forward here.
Blocks whose residual function is not x + z also linearise r (its VJP in x, the zs and its own
captures, and K = dr/dx); a projection step also linearises its shortcut P (K_l^T dense).
"""
from __future__ import annotations

import contextlib
import functools

import torch

from ..analysis.batching import vmappable
from .batch import run_batched
from .spec import CaptureSpec, StreamSpec

try:                                    # node annotations, to find each VJP in the graphs
    from torch.fx.traceback import annotate as _annotate
except ImportError:                     # pragma: no cover - older torch
    _annotate = None


def annotate(**tags):
    """Tag the nodes traced inside with node.meta["custom"] = tags (no-op where unsupported)."""
    return _annotate(tags) if _annotate is not None else contextlib.nullcontext()


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


class GroupVJP:
    """What both forms share: which inputs to differentiate, r, the shortcut, one round's call.

    Members' inputs: xs[l] (x_l's m components), caps (every capture of the stream), randoms[l]
    (block l's saved random draws), saved[l] (the activations its forward saved)."""

    batched: bool

    def __init__(self, spec: StreamSpec, gi: int, xs, caps, randoms, saved, needs_grad):
        g = spec.groups[gi]
        self.gi, self.group, self.members = gi, g, list(g.members)
        self.cap_index = [spec.block_caps[l] for l in self.members]
        self.rcap_index = [spec.rcaps_of(l) for l in self.members]
        self.diff = _wanted(self.cap_index, caps, needs_grad)
        self.rdiff = _wanted(self.rcap_index, caps, needs_grad)
        self.out_diff = list(range(g.n_z)) + \
            [g.n_z + i for i, d in enumerate(g.side_differentiable) if d]
        self.m = spec.width
        self.shared, self.rshared = (), ()
        zs = self._from_saved(spec, xs, caps, randoms, saved) if g.partition is not None \
            else self._recomputed(spec, xs, caps, randoms)
        outs = g.template.graph.output_node().args[0]
        self.z_dtypes = [o.meta["val"].dtype for o in outs[:g.n_z]]
        if g.residual is not None:
            self._linearize_residual(spec, xs, caps, zs)
        if g.shortcut >= 0:
            self._linearize_shortcut(spec, xs, caps, randoms, zs)

    def inputs(self, kind: str):
        """(per member the capture positions, shared per position, positions differentiated)
        of the block ("cap") or of its residual function ("rcap")."""
        if kind == "cap":
            return self.cap_index, self.shared, self.diff
        return self.rcap_index, self.rshared, self.rdiff

    def _member_args(self, spec, l, xs, caps, randoms):
        return [*xs[l], *[caps[i] for i in spec.block_caps[l]], *randoms[l]]

    def _partition_outputs(self):
        """(positions of the x grads, positions of the wanted capture grads) in P.bw's outputs."""
        P, m = self.group.partition, self.m
        grad_at = {p: i for i, p in enumerate(P.diff)}     # primal position -> bw output
        missing = [j for j in self.diff if m + j not in grad_at]
        if missing:                     # an op takes it as a non-differentiable argument
            raise RuntimeError(f"captures {missing} of group {self.gi} need a gradient that "
                               f"the block's saved-activation backward does not compute")
        return [grad_at[j] for j in range(m)], [grad_at[m + j] for j in self.diff]

    def _select(self, outs):
        return tuple(outs[i] for i in self.out_diff)

    def _linearize_shortcut(self, spec, xs, caps, randoms, zs):
        """Per member, K_l^T = (dr/dp dP/dx)^T as two VJPs: r's in p, the shortcut's in x (its
        forward, a 1x1 convolution and a norm, runs once more here)."""
        g, j = self.group, self.group.shortcut
        self.kts = {}
        for i, l in enumerate(self.members):
            z_i = self._zs_of(zs, i)
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

    def _through_residual(self, i: int, cy, final: bool):
        """The zs' cotangents (and r's capture grads) from the state's, through r's VJP."""
        g, m, n_z = self.group, self.m, self.group.n_z
        if m > 1:                          # (.., m, *x) -> one cotangent per component
            cy = tuple(cy.unbind(1 if self.batched else 0))
        if g.residual is None:
            return [cy.to(self.z_dtypes[0])], ()
        rres = self.rfns[i](cy)
        cot_zs = [c.to(dt) for c, dt in zip(rres[m:m + n_z], self.z_dtypes)]
        if g.shortcut >= 0 and not final:  # the scan takes P's path (k_t)
            cot_zs[g.shortcut] = torch.zeros_like(cot_zs[g.shortcut])
        return cot_zs, rres[m + n_z:]

    def __call__(self, cot_y, cot_sides: list, final=False, rows=None, **tags):
        """VJPs of every member at the cotangents g_{l+1} of their outputs (cot_y: stacked, or
        one per member) and of their side outputs (stacked); in a round, of the members
        `rows` only (a slice of their indices; None: all).

        Returns (input grads (n, ...), per vjp_fn its capture grads, per vjp_fn its residual
        capture grads); the final call returns no input grads (None) and needs none."""
        out_x, out_caps, out_rcaps = [], [], []
        for i, fn in self._calls(self.pfns if final else self.fns, rows):
            with annotate(**tags, hbp_call=self._call_name(i)):
                cot_zs, rgrads = self._through_residual(i, self._cot(cot_y, i), final)
                res = fn(tuple(cot_zs + [self._cot(c, i) for c in cot_sides]))
            out_rcaps.append(rgrads)
            out_caps.append(res if final else res[self.m:])
            if not final:
                out_x.append(res[0] if self.m == 1 else
                             torch.stack(res[:self.m], 1 if self.batched else 0))
        return (None if final else self._gather(out_x)), out_caps, out_rcaps


class BatchedVJP(GroupVJP):
    """One vjp_fn over the members stacked on a leading axis: a round is one call."""

    batched = True

    def _call_name(self, i):
        return f"{self.gi}"

    def _calls(self, fns, rows):
        """The one vjp_fn, told which rows of the stacks a round runs over."""
        return enumerate(fns if rows is None else [functools.partial(f, rows=rows) for f in fns])

    def _cot(self, cot, i):
        return cot

    def _gather(self, out_x):
        return out_x[0]

    def _zs_of(self, zs, i):
        return [z[i] for z in zs]

    def _from_saved(self, spec, xs, caps, randoms, saved):
        """One vjp_fn running the partition's backward over the stacked saved activations."""
        g, P, m = self.group, self.group.partition, self.m
        x_grads, cap_grads = self._partition_outputs()
        members, n_act = self.members, P.n_saved
        full, dims = _stack_args(lambda l: spec.block_caps[l], members, g.shared, caps)
        self.shared = [d is None for d in dims]
        args = [stack([xs[l][j] for l in members]) for j in range(m)] + full
        args += [stack([randoms[l][j] for l in members]) for j in range(g.n_random)]
        args += [stack([saved[l][j] for l in members]) for j in range(n_act)]
        flags = [True] * m + [d is not None for d in dims] + [True] * (g.n_random + n_act)
        self.X = args[:m]

        def run(bw, cots, offset, rows=None):
            # a shared weight's gradient is the sum over members, reduced inside the run
            summed = [i - offset for j, i in zip(self.diff, cap_grads) if self.shared[j]]
            some = args if rows is None else [a[rows] if f else a for a, f in zip(args, flags)]
            res, batched = run_batched(bw, [*some, *cots], [*flags, *[True] * len(cots)],
                                       summed)
            return [r if b or i in summed else r.expand(len(cots[0]), *r.shape)
                    for i, (r, b) in enumerate(zip(res, batched))]

        def fn(cots, rows=None):
            """The members' VJPs (of those in `rows`: slices of the stacks, no copy)."""
            if rows is not None:
                cots = tuple(c[rows] for c in cots)
            res = run(P.bw, cots, 0, rows)
            return (*[res[i] for i in x_grads], *[res[i] for i in cap_grads])

        def pfn(cots):
            res = run(P.bw_params, cots, m)
            return tuple(res[i - m] for i in cap_grads)
        self.fns, self.pfns = [fn], [pfn]
        return [stack([saved[l][n_act + j] for l in members]) for j in range(g.n_z)] \
            if g.residual is not None else [None] * g.n_z

    def _recomputed(self, spec, xs, caps, randoms):
        """One vjp_fn of torch.func.vjp over the template vmapped over the members."""
        g, m = self.group, self.m
        full, dims = _stack_args(lambda l: spec.block_caps[l], self.members, g.shared, caps)
        for j in range(g.n_random):          # each member's own draws, stacked
            full.append(stack([randoms[l][j] for l in self.members]))
            dims.append(0)
        self.shared = [d is None for d in dims]
        block = torch.func.vmap(vmappable(g.template), in_dims=(*[0] * m, *dims))
        self.X = [stack([xs[l][j] for l in self.members]) for j in range(m)]
        outs, fn = _linearize(lambda *a: self._select(block(*a)), self.X, full, self.diff, m)
        # one vjp_fn over every member: a round's rows are cut from its input gradients
        self.fns = [lambda cots, rows=slice(None): tuple(
            t[rows] if j < m else t for j, t in enumerate(fn(cots)))]
        self.pfns = [lambda cots: fn(cots)[m:]]
        return list(outs[:g.n_z])

    def _linearize_residual(self, spec, xs, caps, zs):
        """One rfn (r's VJP, vmapped) and K = dr/dx, (n, [m, m,] *x)."""
        g, m, n_z = self.group, self.m, self.group.n_z
        rfull, rdims = _stack_args(spec.rcaps_of, self.members, g.residual_shared, caps)
        self.rshared = [d is None for d in rdims]
        r = torch.func.vmap(g.residual, in_dims=(*[0] * m, *([0] * n_z), *rdims))
        y, rfn = _linearize(r, self.X, [*zs, *rfull],
                            list(range(n_z)) + [n_z + j for j in self.rdiff], m)
        self.rfns = [rfn]
        self.K = _k_of(rfn, y, m)

    def accumulate(self, per_fn, kind: str, accumulate, skip=()):
        """Unstack the capture gradients into the per-capture sums (not those in skip)."""
        index, shared, diff = self.inputs(kind)
        for j, gj in zip(diff, per_fn[0]):
            if j in skip:
                continue
            if shared[j]:                  # vmap's VJP already summed over members
                accumulate(index[0][j], gj)
            else:
                for i, ix in enumerate(index):
                    accumulate(ix[j], gj[i])


class MemberVJP(GroupVJP):
    """One vjp_fn per member: a round is n calls, each at that member's cotangent."""

    batched = False

    def _call_name(self, i):
        return f"{self.gi}.{i}"

    def _calls(self, fns, rows):
        """The vjp_fns of the members a round runs (rows: a slice of them; None: all)."""
        return list(enumerate(fns))[rows or slice(None)]

    def _cot(self, cot, i):
        return cot[i]

    def _gather(self, out_x):
        return out_x

    def _zs_of(self, zs, i):
        return list(zs[i])

    def _from_saved(self, spec, xs, caps, randoms, saved):
        """Per member, the partition's backward on that block's saved activations."""
        P, m = self.group.partition, self.m
        x_grads, cap_grads = self._partition_outputs()
        self.fns, self.pfns = [], []
        for l in self.members:
            args = self._member_args(spec, l, xs, caps, randoms) + list(saved[l][:P.n_saved])

            def fn(cots, args=args):
                res = P.bw(*args, *cots)
                return (*[res[i] for i in x_grads], *[res[i] for i in cap_grads])

            def pfn(cots, args=args):
                res = P.bw_params(*args, *cots)
                return tuple(res[i - m] for i in cap_grads)
            self.fns.append(fn)
            self.pfns.append(pfn)
        return [saved[l][P.n_saved:] for l in self.members]

    def _recomputed(self, spec, xs, caps, randoms):
        """Per member, torch.func.vjp of the template (its forward runs again here)."""
        g, m = self.group, self.m
        self.fns, zs = [], []
        for l, bc in zip(self.members, self.cap_index):
            outs, fn = _linearize(lambda *a: self._select(g.template(*a)), xs[l],
                                  [caps[i] for i in bc] + list(randoms[l]), self.diff, m)
            self.fns.append(fn)
            zs.append(outs[:g.n_z])
        self.pfns = [lambda cots, fn=fn: fn(cots)[m:] for fn in self.fns]
        return zs

    def _linearize_residual(self, spec, xs, caps, zs):
        """Per member, an rfn and K_l = dr/dx_l ([m, m,] *x), one per member."""
        g, m, n_z = self.group, self.m, self.group.n_z
        diff = list(range(n_z)) + [n_z + j for j in self.rdiff]
        self.rfns, Ks = [], []
        for i, (l, rc) in enumerate(zip(self.members, self.rcap_index)):
            y, rfn = _linearize(g.residual, xs[l], [*zs[i], *[caps[c] for c in rc]], diff, m)
            self.rfns.append(rfn)
            Ks.append(_k_of(rfn, y, m, dim=0))
        self.K = Ks

    def accumulate(self, per_fn, kind: str, accumulate, skip=()):
        """Each member's capture gradients into the per-capture sums (not those in skip)."""
        index, _, diff = self.inputs(kind)
        for ix, gs in zip(index, per_fn):
            for j, gj in zip(diff, gs):
                if j not in skip:
                    accumulate(ix[j], gj)


def group_vjp(spec: StreamSpec, gi: int, *args) -> GroupVJP:
    """The linearised group gi, in the form its spec asks for."""
    return (BatchedVJP if spec.groups[gi].batched else MemberVJP)(spec, gi, *args)


def capture_vjp(vjp: GroupVJP, cs: CaptureSpec, cap_grads, rcap_grads, caps, needs_grad,
                accumulate):
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
