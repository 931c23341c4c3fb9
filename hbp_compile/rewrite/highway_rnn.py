"""HighwayRNN: one layer and direction of an RNN module, its forward ATen's op, its backward
Highway-BP over time.

The stream is the state s_t (h_t; (c_t, h_t) for an LSTM), one block per time step, all
sharing the cell's weights. Nothing in the backward is sequential in T:

    recompute   the gates of all T steps at once from h_{t-1} = (h_0, out[:-1]) and x
                (one batched cell forward over T x B rows: the "block" z_t); an LSTM's c_t
                then follow from one linear scan c_t = f_t c_{t-1} + i_t g_t
    round 0     g^0 = scan(K, e)             e_t: the gradients of out[t-1] (and h_T, c_T)
    round r     v = J^T g^{r-1}_{+1}           ONE VJP of the cell over all T x B rows
                g^r = scan(K, v + e)
    final       dW, dx = the cell's VJP at g^k_{+1}; dh_0 (dc_0) = g^k_0

with K_t = dr/ds_{t-1} at fixed gates: 0 for a plain RNN (h_t = tanh(.) has no residual
path), diag(z_t) for a GRU (h_t = z h + (1 - z) n), and for an LSTM's (c, h) the 2 x 2
[[f, 0], [o tanh'(c_t) f, 0]], whose zero column makes its scan a diagonal one in c.
Tensors along the stream are (T + 1, B, H), row t the value at s_t; cell rows are (T, B, *).
"""
from __future__ import annotations

import dataclasses

import torch

from .. import rnn_ops                           # noqa: F401 - registers torch.ops.hbp.*
from .group_vjp import annotate
from .highway_stream import failures_name
from .scan import reverse_scan_op


def scan_over_time(a, k, form):
    """g_t = a_t + k_t g_{t+1}: one opaque op (see rnn_ops.reverse_linear_scan for why);
    a may be a pair (e, v): e (T + 1, ...) plus v (T, ...) on its first rows."""
    e, v = a if isinstance(a, tuple) else (a, None)
    return reverse_scan_op(e, k, form, v)


def _dense(a):
    """A stream tensor given as (e, v) (see scan_over_time) as one (T + 1, ...) tensor."""
    if not isinstance(a, tuple):
        return a
    e, v = a
    return e + torch.cat([v, torch.zeros_like(v[:1])])


class Cell:
    """One RNN cell split into its block (the gates, all the matmuls) and residual function."""

    m = 1                                         # state components

    def block(self, h, x, *params):
        raise NotImplementedError

    def residual(self, states, zs):
        """The new state from the old one and the block outputs (differentiated in zs)."""
        raise NotImplementedError

    def scan(self, A, states, zs, decay: float, form: str):
        """g_t = decay K_{t+1}^T g_{t+1} + a_t for every component (tuples of (T + 1, B, H))."""
        raise NotImplementedError

    def kt(self, states, zs, G_next):
        """K_{t+1}^T g_{t+1} (the gamma split adds gamma times it to each block VJP)."""
        raise NotImplementedError

    def states(self, h_prev, hx, zs, form):
        """The states s_{t-1} the steps start from, t = 1..T."""
        return (h_prev,)


def _linear_gates(h, x, params):
    w_ih, w_hh, *b = params
    b_ih, b_hh = b if b else (None, None)
    return _linear(x, w_ih, b_ih), _linear(h, w_hh, b_hh)


def _linear(x, w, b):
    """F.linear over (T, B, in) as one 2-d matmul. F.linear's 3-d path, run under torch.func,
    reads the sizes as ints: a symbolic sequence length would be specialised (a recompile per
    length)."""
    y = x.flatten(0, 1) @ w.t()
    y = y if b is None else y + b
    return y.unflatten(0, x.shape[:2])


class PlainCell(Cell):
    """h_t = act(W_ih x + b_ih + W_hh h + b_hh): no residual path, K = 0."""

    def __init__(self, act):
        self.act = act

    def block(self, h, x, *params):
        gi, gh = _linear_gates(h, x, params)
        return (self.act(gi + gh),)

    def residual(self, states, zs):
        return zs

    def scan(self, A, states, zs, decay, form):
        return tuple(map(_dense, A))

    def kt(self, states, zs, G_next):
        return (torch.zeros_like(G_next[0]),)


class GRUCell(Cell):
    """h_t = z h + (1 - z) n (PyTorch's gate order r, z, n): K = diag(z)."""

    def block(self, h, x, *params):
        gi, gh = _linear_gates(h, x, params)
        i_r, i_z, i_n = gi.chunk(3, -1)
        h_r, h_z, h_n = gh.chunk(3, -1)
        r = torch.sigmoid(i_r + h_r)
        return torch.sigmoid(i_z + h_z), torch.tanh(i_n + r * h_n)

    def residual(self, states, zs):
        (h,), (z, n) = states, zs
        return (z * h + (1 - z) * n,)

    def scan(self, A, states, zs, decay, form):
        return (scan_over_time(A[0], decay * zs[0], form),)

    def kt(self, states, zs, G_next):
        return (zs[0] * G_next[0],)


class LSTMCell(Cell):
    """c_t = f c + i g, h_t = o tanh(c_t) over the widened state (c, h)."""

    m = 2

    def block(self, h, x, *params):
        gi, gh = _linear_gates(h, x, params)
        i, f, g, o = (gi + gh).chunk(4, -1)
        return torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)

    def residual(self, states, zs):
        (c, _), (i, f, g, o) = states, zs
        c_new = f * c + i * g
        return c_new, o * torch.tanh(c_new)

    def states(self, h_prev, hx, zs, form):
        i, f, g, _ = zs                           # c_t = f_t c_{t-1} + i_t g_t, run in reverse
        a = torch.cat([(i * g).flip(0), hx[1].unsqueeze(0)])
        c = scan_over_time(a, f.flip(0), form).flip(0)                 # (T + 1, B, H)
        return c[:-1], h_prev

    def _dh_dc(self, states, zs):
        """o_t tanh'(c_t) f_t: how h_t moves with c_{t-1} at fixed gates."""
        (c, _), (i, f, g, o) = states, zs
        return o * (1 - torch.tanh(f * c + i * g) ** 2) * f

    def scan(self, A, states, zs, decay, form):
        a_c, a_h = map(_dense, A)    # g^h_t = a^h_t: h_{t-1} reaches s_t only through gates
        cross = decay * self._dh_dc(states, zs) * a_h[1:]
        a_c = a_c + torch.cat([cross, torch.zeros_like(cross[:1])])
        return scan_over_time(a_c, decay * zs[1], form), a_h

    def kt(self, states, zs, G_next):
        g_c, g_h = G_next
        return zs[1] * g_c + self._dh_dc(states, zs) * g_h, torch.zeros_like(g_h)


CELLS = {"rnn_tanh": PlainCell(torch.tanh), "rnn_relu": PlainCell(torch.relu),
         "gru": GRUCell(), "lstm": LSTMCell()}


@dataclasses.dataclass(frozen=True)
class RNNSpec:
    """Static description of one rewritten layer and direction."""

    name: str
    mode: str                      # "rnn_tanh", "rnn_relu", "gru", "lstm"
    has_biases: bool
    train: bool
    iters: int
    gamma: float
    scan: str                      # rewrite.scan.choose_scan's form for T + 1 positions
    chunks: int = 1                # runs of time steps of the cell's recompute and VJPs


CPU_RUNS = 8                       # runs of time steps on a CPU under "auto" (cell_chunks)
MIN_RUN_STEPS = 8                  # ... where every run has at least this many steps
MAX_ITERS_IN_RUNS = 10             # ... and k is at most this


def cell_chunks(option, T, iters: int, device: str) -> int:
    """How many runs of time steps the backward's cell recompute and VJPs are split into (the
    rnn_time_chunks option: an int, or "auto"); always one where T is symbolic.

    Each run is its own copy of the cell's kernels in the backward graph: runs cost compile
    time and buy memory, every (steps, B, gates x H) temporary a run's size. "auto" asks for
    CPU_RUNS on a CPU (where T >= CPU_RUNS x MIN_RUN_STEPS), one on a GPU: a fixed number, so
    that the graph and its compile time do not grow with T. Measured on this project's CPU VM
    (benchmarks/README.md): nn.GRU T = 1024, batch 32, k = 2, in 1 and in 4 runs takes
    16,000-18,000 page faults a step (glibc hands its large per-step buffers back to the
    kernel at each step's end and faults them in again) and steps at 0.89-0.92x of exact; in
    8 and 16 runs (gate tensors of 3 and 1.5 MB) no fault and 0.73-0.75x. At T = 256 runs
    cost no step time. The price is compile time: 8 runs compile in about 3x the time of one
    (an empty cache: nn.GRU 12 s against 4 s), the same at T = 64 and T = 1024. The runs are
    copied into each of the k + 2 VJPs, so past MAX_ITERS_IN_RUNS (the paper's range of k)
    "auto" takes one run: at k = T = 64 a 2-layer bidirectional LSTM compiled in 483 s in 8
    runs, 83 s in one, while at k = 5 and 10 one run stepped 10-25% slower (nn-gru1024,
    nn-lstm1024)."""
    if not isinstance(T, int):
        return 1
    if option != "auto":
        asked = option
    elif device != "cpu" or T < CPU_RUNS * MIN_RUN_STEPS or iters > MAX_ITERS_IN_RUNS:
        return 1
    else:
        asked = CPU_RUNS
    return len(_time_cuts(T, asked))     # runs of equal length: 4 asked of T = 9 are 3 of 3


def _injections(grads, out, hx, m):
    """E: the gradients entering each state from outside, m tuples of (T + 1, B, H)."""
    g_out, g_last = grads[0], grads[1:]
    zero = torch.zeros_like(hx[0])
    e_h = torch.cat([zero.unsqueeze(0), g_out if g_out is not None else torch.zeros_like(out)])
    if g_last[0] is not None:
        e_h = torch.cat([e_h[:-1], (e_h[-1] + g_last[0]).unsqueeze(0)])
    if m == 1:
        return (e_h,)
    e_c = torch.zeros_like(e_h)
    if g_last[1] is not None:
        e_c = torch.cat([e_c[:-1], g_last[1].unsqueeze(0)])
    return e_c, e_h


class HighwayRNN(torch.autograd.Function):
    """(x, *hx, *params) -> (out, h_T[, c_T]) as ATen computes them; Highway-BP backward."""

    @staticmethod
    def forward(ctx, spec: RNNSpec, x, *rest):
        n_h = CELLS[spec.mode].m
        hx, params = list(rest[:n_h]), list(rest[n_h:])
        outs = torch.ops.hbp.rnn_layer(spec.mode, x, hx, params, spec.has_biases, spec.train)
        ctx.spec, ctx.n_h = spec, n_h
        ctx.save_for_backward(x, outs[0], *hx, *params)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        with failures_name(ctx.spec.name):
            return HighwayRNN._backward(ctx, *grads)

    @staticmethod
    def _backward(ctx, *grads):
        spec, cell = ctx.spec, CELLS[ctx.spec.mode]
        x, out, *rest = ctx.saved_tensors
        hx, params = rest[:ctx.n_h], rest[ctx.n_h:]
        tags = dict(hbp_stream=spec.name, hbp_group=0, hbp_call="0")
        h_prev = torch.cat([hx[0].unsqueeze(0), out[:-1]])               # (T, B, H)
        with annotate(hbp_stream=spec.name, hbp_recompute=1):
            zs, block_vjp = _linearize_block(cell, h_prev, x, params,
                                             _time_cuts(x.shape[0], spec.chunks))
            states = cell.states(h_prev, hx, zs, spec.scan)
        _, residual_vjp = torch.func.vjp(lambda *z: cell.residual(states, z), *zs)

        def cell_vjp(G):                          # every step's VJP at g_{t+1}, one call
            return block_vjp(residual_vjp(tuple(g[1:] for g in G)))

        E = _injections(grads, out, hx, cell.m)
        decay = 1.0 - spec.gamma
        with annotate(hbp_stream=spec.name, hbp_scan=0):
            G = cell.scan(E, states, zs, decay, spec.scan)
        for r in range(1, spec.iters + 1):
            with annotate(**tags, hbp_round=r):
                v = cell_vjp(G)[0]                                        # (T, B, H)
                if spec.gamma:
                    kg = cell.kt(states, zs, tuple(g[1:] for g in G))
                    v = v + spec.gamma * kg[-1]
                    extra = [spec.gamma * k for k in kg[:-1]]
                else:
                    extra = [None] * (cell.m - 1)
            A = tuple(e if a is None else (e, a) for e, a in zip(E, [*extra, v]))
            with annotate(hbp_stream=spec.name, hbp_scan=r):
                G = cell.scan(A, states, zs, decay, spec.scan)
        with annotate(**tags, hbp_round="final"):
            _, dx, *dparams = cell_vjp(G)
        g0 = [g[0] for g in G]                    # state order (c, h); hx's is (h, c)
        return (None, dx, *g0[::-1], *dparams)


def _linearize_block(cell: Cell, h_prev, x, params, cuts):
    """The cell's block (its gates: every matmul) at all T steps, and its VJP (cotangents of
    the zs -> dh_prev, dx, *dparams), run in the given runs of time steps: zs (T, B, *)."""
    parts = [torch.func.vjp(cell.block, h_prev[a:b], x[a:b], *params) for a, b in cuts]
    if len(parts) == 1:
        return parts[0]
    zs = tuple(torch.cat(z) for z in zip(*(zs for zs, _ in parts)))

    def vjp(cots):
        outs = [fn(tuple(c[a:b] for c in cots)) for (a, b), (_, fn) in zip(cuts, parts)]
        dh, dx, *dparams = zip(*outs)
        return (torch.cat(dh), torch.cat(dx), *[sum(g[1:], g[0]) for g in dparams])
    return zs, vjp


def _time_cuts(T, chunks: int) -> list[tuple]:
    """[start, end) of at most `chunks` runs of time steps of one length (the last shorter)
    covering 0..T; one run touches no size, so a symbolic T stays symbolic."""
    if chunks <= 1:
        return [(0, T)]
    step = -(-T // min(chunks, T))
    return [(a, min(a + step, T)) for a in range(0, T, step)]


def highway_rnn(spec: RNNSpec):
    """The graph-level callable for one layer: HighwayRNN.apply with the spec closed over."""
    def call(x, *rest):
        return HighwayRNN.apply(spec, x, *rest)
    call.__name__ = call.__qualname__ = spec.name
    return call
