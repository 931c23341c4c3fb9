"""Scans along the residual path: solve g_l = c * g_{l+1} + a_l backwards in l.

Written with plain torch ops so that AOTAutograd traces them and Inductor compiles them. Two
forms of the diagonal scan: a sequential loop (n - 1 small fused multiply-adds, n - 1 dependent
steps, the least arithmetic) and a Hillis-Steele doubling scan (log2(n) steps of O(n) work).
A third, "op", runs either of them as ONE opaque op (rnn_ops.reverse_linear_scan): the graph
then holds one node whatever the length, and a CPU runs the recurrence in place. `choose_scan`
picks one by stream length, from thresholds measured by benchmarks/bench_scan.py.
"""
from __future__ import annotations

import math

import torch

from .group_vjp import stack


def reverse_cumsum(a: torch.Tensor) -> torch.Tensor:
    """g_l = sum_{j >= l} a_j along dim 0 (identity residuals, K_l = I)."""
    return a.flip(0).cumsum(0).flip(0)


def reverse_scan_scalar(a: torch.Tensor, decay: float) -> torch.Tensor:
    """g_l = decay * g_{l+1} + a_l along dim 0, g_{n-1} = a_{n-1} (K_l = decay * I).

    decay = 1 is a reverse cumsum and decay = 0 no scan at all; otherwise a Hillis-Steele
    doubling scan, log2(n) steps, which stays finite where the rescaling trick
    cumsum(decay^-l a_l) would overflow for long streams.
    """
    if decay == 1.0:
        return reverse_cumsum(a)
    if decay == 0.0:
        return a
    n, g, d = a.shape[0], a, 1
    while d < n:
        # after this step g_l = sum_{j = l}^{l + 2d - 1} decay^(j - l) a_j
        shifted = torch.cat([g[d:], torch.zeros_like(g[:d])])
        g = g + (decay ** d) * shifted
        d *= 2
    return g


def reverse_linear_scan(a: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """g_l = a_l + k_l * g_{l+1} along dim 0, g_{n-1} = a_{n-1} (diagonal K_l).

    a: (n, *x.shape); k: (n - 1, *x.shape) or broadcastable, k_l the factor between positions
    l and l + 1 (dx_{l+1}/dx_l). Hillis-Steele doubling, log2(n) steps: after the step with
    distance d, g_l = a_l + p_l * g_{l+d} where p_l = k_l ... k_{l+d-1}. (The paper's
    Algorithm 1 starts the running product at the factor of position l + 1; it must start at
    k_l, the factor between l and l + 1.)
    """
    n = a.shape[0]
    if n == 1:
        return a
    g = a
    # p_l for the current distance; positions without a successor get 0 (nothing flows in)
    p = torch.cat([k.expand(n - 1, *a.shape[1:]).to(a.dtype), torch.zeros_like(a[:1])])
    d = 1
    while d < n:
        g = g + p * torch.cat([g[d:], torch.zeros_like(g[:d])])
        p = p * torch.cat([p[d:], torch.zeros_like(p[:d])])
        d *= 2
    return g



def reverse_linear_scan_sequential(a: torch.Tensor, k) -> torch.Tensor:
    """reverse_linear_scan as the plain recurrence: n - 1 dependent steps, no extra work."""
    n = a.shape[0]
    rows = [None] * n
    rows[n - 1] = a[n - 1]
    for l in range(n - 2, -1, -1):
        kl = k[l] if isinstance(k, torch.Tensor) and k.dim() == a.dim() else k
        rows[l] = a[l] + rows[l + 1] if isinstance(kl, float) and kl == 1.0 \
            else a[l] + kl * rows[l + 1]
    return torch.stack(rows)


def reverse_linear_scan_chunked(a: torch.Tensor, k, chunk: int = 0) -> torch.Tensor:
    """reverse_linear_scan in O(sqrt(n)) dependent steps of O(n) total work, no doubling.

    Positions are cut into C chunks of c (n padded with zeros): every chunk scans its own
    positions at once (c steps, all chunks together), the chunk starts are scanned across
    chunks (C steps), and each position adds its chunk's carry: g = g_local + P * G_next, with
    P the product of k from the position to its chunk's end. k: (n - 1, *x.shape), broadcastable,
    or a float (K = k I). The graph holds about 3c + 2C steps instead of n (sequential) or
    n log2(n) work (doubling)."""
    n = a.shape[0]
    if n <= 2:
        return reverse_linear_scan_sequential(a, k)
    c = chunk or max(2, math.isqrt(n))
    C = -(-n // c)
    pad = C * c - n
    if not isinstance(k, torch.Tensor):
        k = torch.full_like(a[:-1], float(k))
    k = k.expand(n - 1, *a.shape[1:]).to(a.dtype)
    # k_l for l in 0..n-1 (nothing flows into the last position or the padding)
    kf = torch.cat([k, a.new_zeros((1 + pad, *a.shape[1:]))]).unflatten(0, (C, c))
    af = torch.cat([a, a.new_zeros((pad, *a.shape[1:]))]).unflatten(0, (C, c)) if pad else \
        a.unflatten(0, (C, c))
    g_loc, prod = [None] * c, [None] * c        # per position in a chunk, all chunks: (C, *x)
    g_loc[c - 1], prod[c - 1] = af[:, c - 1], kf[:, c - 1]
    for j in range(c - 2, -1, -1):
        g_loc[j] = af[:, j] + kf[:, j] * g_loc[j + 1]
        prod[j] = kf[:, j] * prod[j + 1]
    starts = [None] * (C + 1)                   # true g at each chunk's first position
    starts[C] = torch.zeros_like(a[0])
    for i in range(C - 1, -1, -1):
        starts[i] = g_loc[0][i] + prod[0][i] * starts[i + 1]
    carry = torch.stack(starts[1:])             # g at the start of the next chunk: (C, *x)
    g = torch.stack(g_loc, 1) + torch.stack(prod, 1) * carry.unsqueeze(1)
    return g.flatten(0, 1)[:n]


def reverse_scan_op(a: torch.Tensor, k: torch.Tensor, form: str = "log-depth",
                    v=None) -> torch.Tensor:
    """g_l = a_l (+ v_l) + k_l g_{l+1} as ONE opaque op (rnn_ops.reverse_linear_scan); k is
    broadcast to (n - 1, *x.shape); `form` is what the op runs where it does not run the
    recurrence in place (a GPU); v (n - 1 rows) is added to a's first rows inside."""
    from .. import rnn_ops                          # noqa: F401 - registers torch.ops.hbp.*
    return torch.ops.hbp.reverse_linear_scan(a, k.expand(a.shape[0] - 1, *a.shape[1:]), form, v)


def reverse_scan(a: torch.Tensor, k, form: str) -> torch.Tensor:
    """g_l = a_l + k_l g_{l+1} in the form choose_scan picked; k a tensor (diagonal K_l, as in
    reverse_linear_scan) or a float (K = k I; 0 is no scan, 1 a reverse sum)."""
    scalar = not isinstance(k, torch.Tensor)
    if scalar and k == 0.0:
        return a
    if form == "op":
        k = a.new_full((1,) * a.dim(), k) if scalar else k.to(a.dtype)
        return reverse_scan_op(a, k)
    if form == "sequential":
        return reverse_linear_scan_sequential(a, k)
    if form == "chunked":
        return reverse_linear_scan_chunked(a, k)
    return reverse_scan_scalar(a, k) if scalar else reverse_linear_scan(a, k)


# Longest stream (L + 1 positions) that scans sequentially under scan="auto", per device type.
# CPU, measured by benchmarks/bench_scan.py (results/bench_scan_cpu.json, Inductor, (32, 64)
# per position, 1 thread): the loop's n - 1 fused multiply-adds beat doubling's n log2(n) work
# at every length (1.4 vs 12.3 ms at n = 256), but its unrolled graph compiles ever longer
# (6 s at 64, 17 s at 128, 42 s at 256, vs about 3 s for doubling). Past 32 positions "auto"
# takes the opaque op: the same recurrence, in place, with a graph of one node (a GRU loop's
# backward compile then no longer grows with T). CUDA: not measured yet (no GPU so far);
# doubling's log2(n) steps are assumed to win from short lengths on, as in the paper.
SEQUENTIAL_MAX = {"cpu": 32, "cuda": 8}


def choose_scan(n: int, device_type: str, scan: str = "auto") -> str:
    """"sequential", "op" or "log-depth" for a diagonal scan over n positions on this device.

    On a CPU, past SEQUENTIAL_MAX the opaque op (the chunked scan, O(sqrt(n)) graph steps, is
    still there by name; the doubling scan's n log2(n) work cost a 257-step GRU 26 ms of a
    36 ms backward, profiled); on a GPU the doubling scan's log2(n) depth."""
    if scan != "auto":
        return scan
    # a symbolic length is compared with nothing (no guard): it takes the long-stream form
    if isinstance(n, int) and n <= SEQUENTIAL_MAX.get(device_type, 8):
        return "sequential"
    return "op" if device_type == "cpu" else "log-depth"


def choose_matrix_scan(n: int, scan: str) -> str:
    """"sequential" or "log-depth" for a widened (m x m) scan: neither the chunked scan nor
    the opaque op has that form; a CPU keeps the loop up to 128 positions (compile time)."""
    if scan in ("sequential", "log-depth"):
        return scan
    return "sequential" if scan == "op" and n <= 128 else "log-depth"


# Widened states (an LSTM's (c, h)): m components per position and an m x m Jacobian per
# coordinate. a: (n, m, *x.shape); k: (n - 1, m, m, *x.shape) with k[l, j, i] = dr_j/dx_i
# between positions l and l + 1, so g_l[i] = a_l[i] + sum_j k_l[j, i] g_{l+1}[j].

def reverse_matrix_scan_sequential(a: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """g_l = a_l + k_l^T g_{l+1} per coordinate: the plain recurrence."""
    n = a.shape[0]
    rows = [None] * n
    rows[n - 1] = a[n - 1]
    for l in range(n - 2, -1, -1):
        rows[l] = a[l] + (k[l] * rows[l + 1].unsqueeze(1)).sum(0)      # sum over j
    return torch.stack(rows)


def reverse_matrix_scan(a: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """reverse_matrix_scan_sequential as a Hillis-Steele doubling scan (log2(n) steps).

    p_l maps g_{l+d} to its contribution at l (p[l, i, j], the transposed k's product):
    g_l += p_l g_{l+d}, then p_l = p_l p_{l+d}."""
    n = a.shape[0]
    if n == 1:
        return a
    p = torch.cat([k.transpose(1, 2).to(a.dtype), torch.zeros_like(k[:1]).to(a.dtype)])
    g, d = a, 1
    while d < n:
        g_far = torch.cat([g[d:], torch.zeros_like(g[:d])])             # (n, m, *x)
        g = g + (p * g_far.unsqueeze(1)).sum(2)
        p_far = torch.cat([p[d:], torch.zeros_like(p[:d])])             # (n, m, m, *x)
        p = (p.unsqueeze(3) * p_far.unsqueeze(1)).sum(2)
        d *= 2
    return g


# ---------------------------------------------------------------------------------------------
# The stream's scan, round after round: how HighwayStream's backward lays out g and solves for
# it. Chosen here, in one place (stream_scan), which also gives the report its words.
#
#   StackedScan    g is one (L + 1, [m,] *x) tensor: a group's cotangents are one slice, the
#                  scan one of the forms above (the batched VJPs read their rows without a copy)
#   PositionScan   g is one tensor per position, scanned position by position: where x_l
#                  changes shape (projection steps), and where every group runs one VJP per
#                  block and the scan is the sequential loop anyway: each g_l is then freed as
#                  soon as its block's VJP has read it, instead of a stream-sized buffer living
#                  through the round (and the forward's last rows no longer pin the next one).

def layout(spec) -> str:
    """"position" or "stacked": how the backward holds a stream's g (see above)."""
    if spec.projections:
        return "position"
    if spec.width == 1 and spec.scan == "sequential" and spec.gamma != 1 \
            and not any(g.batched for g in spec.groups):
        return "position"
    return "stacked"


def describe(spec) -> str:
    """The report's words for the scan of a stream."""
    where = ", one state per position" if layout(spec) == "position" else ""
    if spec.gamma == 1:
        return "none (gamma=1: fixed-point iteration)"
    if spec.projections:
        from ..report import ranges
        return (f"sequential, one state per position (x_l changes shape at projection step(s) "
                f"{ranges(sorted(spec.projections))}, whose dense K_l^T is the shortcut's VJP)")
    decay = f" x (1-gamma)={1 - spec.gamma:g}" if spec.gamma else ""
    if spec.width > 1:
        m = spec.width
        return f"{spec.scan} scan with {m}x{m} K_l = dr/dx_l per coordinate (x_l has {m} " \
            f"components)" + decay
    if not spec.identity:
        return f"{spec.scan} diagonal scan, K_l = dr/dx_l" + decay + where
    if spec.gamma:
        return f"{spec.scan} scan, K=(1-gamma)I={1 - spec.gamma:g}I" + where
    return {"sequential": f"reverse sum ({spec.length} fused adds)",
            "chunked": "chunked reverse sum", "op": "reverse sum (one op)"}.get(
                spec.scan, "reverse cumsum") + where


def describe_rnn(mode: str, form: str) -> str:
    """The report's words for the scan over time of an RNN module's layer."""
    if mode.startswith("rnn"):
        return "none (K = 0)"
    return f"{form} diagonal scan over time" + \
        (", K = diag(z)" if mode == "gru" else ", K in c: f (h through o tanh'(c) f)")


def stream_scan(spec, inject, vjps, xs):
    """The scan of one stream's backward: inject[l] are the gradients (m components, None: 0)
    injected at x_l from outside it; vjps the linearised groups (their K)."""
    cls = PositionScan if layout(spec) == "position" else StackedScan
    return cls(spec, inject, vjps, xs)


class PositionScan:
    """g as a list of L + 1 tensors; K_l diagonal, the identity, or a projection's dense K_l^T."""

    def __init__(self, spec, inject, vjps, xs):
        L = self.L = spec.length
        self.gamma, self.decay = spec.gamma, 1.0 - spec.gamma
        self.K = [None] * L                              # diagonal K_l; None: the identity
        self.dense = {}                                  # projection step l -> its group
        for v in vjps:
            if v.group.residual is not None:
                for i, l in enumerate(v.members):
                    self.K[l] = v.K[i]
            if v.group.shortcut >= 0:
                self.dense.update({l: v for l in v.members})
        self.dtypes = [x[0].dtype for x in xs]
        self.e = [None if e[0] is None else e[0].to(dt) for e, dt in zip(inject, self.dtypes)]
        self.e.append(inject[L][0] if inject[L][0] is not None or self.dense
                      else torch.zeros_like(xs[-1][0]))

    def k_t(self, l, g):
        """K_l^T g_{l+1}."""
        if l in self.dense:
            return self.dense[l].k_t(l, g)
        return g if self.K[l] is None else self.K[l] * g

    def first(self):
        """Round 0: g^0 from the injected gradients alone."""
        return self._scan(list(self.e))

    def next(self, parts, G):
        """Round r: A_l = e_l + the block VJPs at l (+ gamma K_l^T g^{r-1}_{l+1}); scan."""
        A = list(self.e)
        for members, v in parts:
            for i, l in enumerate(members):
                A[l] = _plus(A[l], v[i].to(self.dtypes[l]))
        if self.gamma:
            for l in range(self.L):
                A[l] = _plus(A[l], self.gamma * self.k_t(l, G[l + 1]))
        return self._scan(A)

    def _scan(self, A):
        """g_l = (1 - gamma) K_l^T g_{l+1} + A_l, from g_L = A_L down (None: no A_l)."""
        G = [None] * self.L + [A[self.L]]
        for l in reversed(range(self.L)):
            kg = self.k_t(l, G[l + 1])
            G[l] = _plus(A[l], kg if self.decay == 1.0 else self.decay * kg)
        return G

    def cotangents(self, G, vjp):
        """The members' g_{l+1}: one per member, or stacked for a batched group."""
        rows = [G[l + 1] for l in vjp.members]
        return stack(rows) if vjp.batched else rows

    def g0(self, G):
        return [G[0]]


def _plus(a, b):
    return b if a is None else a + b


class StackedScan:
    """g as one (L + 1, [m,] *x) tensor; K_l the identity, diagonal, or m x m per coordinate."""

    def __init__(self, spec, inject, vjps, xs):
        self.L, self.m = L, m = spec.length, spec.width
        self.gamma, self.decay, self.form = spec.gamma, 1.0 - spec.gamma, spec.scan
        self.x0 = x0 = xs[0][0]
        self.inject = inject
        self.zero = self._row([None] * m)
        # Most streams take gradients at x_L only: E is then never built, a stream-sized
        # buffer less per round (rows without a block VJP are filled with e_L instead)
        self.only_last = all(v is None for e in inject[:L] for v in e)
        self.e_last = self._row(inject[L])
        self.E = None if self.only_last else self._injections()
        if spec.identity:
            self.K = None
        elif m == 1:                    # K_l = dr/dx_l, (L, *x.shape); 1 for x + z steps
            self.K = _to_stream([(v.members, v.K) for v in vjps if v.group.residual is not None],
                                L, torch.ones_like(x0))[:L]
        else:                           # widened: m x m per coordinate, (L, m, m, *x)
            self.K = _to_stream([(v.members, v.K) for v in vjps], L, vjps[0].K[0])[:L]

    def _row(self, values):
        """m per-component tensors (None: 0) -> one row (*x) or (m, *x)."""
        rows = [torch.zeros_like(self.x0) if v is None else v.to(self.x0.dtype) for v in values]
        return rows[0] if self.m == 1 else torch.stack(rows)

    def _injections(self):
        return stack([self._row(e) for e in self.inject])        # (L + 1, [m,] *x)

    def _scan(self, A):
        if self.K is None:              # a sequential reverse sum is L fused adds (aten's
            return reverse_scan(A, self.decay, self.form)     # cumsum along dim 0 is slow)
        if self.m == 1:
            return reverse_scan(A, self.decay * self.K, self.form)
        matrix_scan = reverse_matrix_scan_sequential if self.form == "sequential" \
            else reverse_matrix_scan
        return matrix_scan(A, self.decay * self.K)

    def first(self):
        """Round 0: g^0 from the injected gradients alone."""
        if self.only_last and self.K is None and self.decay == 1.0:   # every g^0_l is e_L
            return self.e_last.unsqueeze(0).expand(self.L + 1, *self.e_last.shape)
        return self._scan(self.E if self.E is not None else self._injections())

    def next(self, parts, G):
        """Round r: A = E + the block VJPs (+ gamma K^T g^{r-1}_{+1}); scan."""
        A = _to_stream(parts, self.L, self.e_last) if self.E is None else \
            _to_stream(parts, self.L, self.zero) + self.E
        if self.gamma:                                       # gamma split: + gamma K g_{l+1}
            K = self.K
            kg = G[1:] if K is None else K * G[1:] if self.m == 1 else \
                (K * G[1:].unsqueeze(2)).sum(1)                  # K_l^T g_{l+1}
            A = A + self.gamma * torch.cat([kg, self.zero.unsqueeze(0)])
        return self._scan(A)

    def cotangents(self, G, vjp):
        """The members' g_{l+1}, (n, [m,] *x): a strided slice where the members are evenly
        spaced (no copy), a stack otherwise."""
        idx = [l + 1 for l in vjp.members]
        if len(idx) == 1:
            return G[idx[0]].unsqueeze(0)
        step = idx[1] - idx[0]
        if step > 0 and all(b - a == step for a, b in zip(idx, idx[1:])):
            return G[idx[0]: idx[-1] + 1: step]
        return stack([G[i] for i in idx])

    def g0(self, G):
        return [G[0]] if self.m == 1 else list(G[0].unbind(0))


def _to_stream(parts, length: int, fill: torch.Tensor) -> torch.Tensor:
    """Per-group rows (members, stacked (n, *x) or one per member) -> (length + 1, *x), the
    rows without a block filled with `fill`: one copy."""
    runs = sorted(parts, key=lambda p: p[0][0]) if parts else []
    if runs and all(isinstance(t, torch.Tensor) and list(m) == list(range(m[0], m[0] + len(m)))
                    for m, t in runs):
        return _concat_runs(runs, length, fill)
    rows = [None] * (length + 1)
    for members, t in parts:
        for i, l in enumerate(members):
            rows[l] = t[i]
    return stack([fill if r is None else r for r in rows])


def _concat_runs(runs, length: int, fill: torch.Tensor) -> torch.Tensor:
    """_to_stream for parts that are runs of consecutive rows (members a..b, stacked): one
    cat of the runs and of `fill` repeated over the gaps (a node per run, not per row)."""
    pieces, at = [], 0
    for members, t in runs:
        if members[0] > at:
            pieces.append(fill.expand(members[0] - at, *fill.shape))
        pieces.append(t)
        at = members[0] + len(members)
    pieces.append(fill.expand(length + 1 - at, *fill.shape))
    return torch.cat(pieces)
