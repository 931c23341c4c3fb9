"""Test models whose residual function is not a plain add (the paper's Table 1).

Same contract as models.py, generalised for oracle_general.highway_backward_general:

- `forward(*inputs)` returns a scalar loss.
- `stream_view(*inputs) -> (streams, head)`: `streams` is a list of `(x0, steps)`; `x0` is the
  stream's initial state, still attached to the prelude's graph; `steps` is a list of
  `(block, residual)` with `zs = block(x_l)` a tuple of tensors (the expensive part, everything
  that depends on x_l other than elementwise) and `x_{l+1} = residual(x_l, *zs)` (cheap,
  elementwise in x_l; it may read parameters, e.g. a LayerScale vector or a LayerNorm's affine).
  `head(states)` takes one list `[x_0, ..., x_L]` per stream and returns the loss as forward does.
- `example_inputs(batch_size)` draws random inputs of the model's dtype.

`stream_loss_general(streams, head)` runs a decomposition forward; tests check it equals forward
bit for bit (the one exception, PostLNEncoder's paper-algebra view, equals it to rounding).

Residual functions and their K (Jacobian in x with zs fixed):
  PostActResNet   relu(x + z)                      K = diag(relu'(x + z))
  GRULoop         (1 - z) * n + z * h              K = diag(z)
  GRUCellLoop     (h - n) * z + n                  K = diag(z)   (PyTorch's own op order)
  LSTMLoop        see its docstring: the stream must be (c, h) or (c, o), not c alone
  ElmanLoop       h + z                            K = I
  LayerScaleMLP   x + gamma_l * z                  K = I  (gamma_l a residual parameter)
  GatedMLP        a * x + z                        K = diag(a)
  PostLNEncoder   LN(x + z)                        K = full LN Jacobian (rows mix), or with
                  paper_algebra=True: (x + z - mu) * rstd * w + b with (z, mu, rstd) block
                  outputs, K = diag(w * rstd)

BatchNorm (PostActResNet) is in train mode: every call of a block updates its running_mean /
running_var / num_batches_tracked. Nothing here calls a block on its own: stream_view only builds
closures, and stream_loss_general / oracle_general call each block exactly once per pass, like
forward. Train-mode outputs use batch statistics only, so values never depend on how many passes
ran before; the buffers after one oracle pass equal those after one forward (tested).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def stream_loss_general(streams, head):
    """Run every stream's steps from its x0 (with autograd) and return head(states)."""
    states = []
    for x0, steps in streams:
        xs = [x0]
        for block, residual in steps:
            xs.append(residual(xs[-1], *block(xs[-1])))
        states.append(xs)
    return head(states)


def add(x, z):
    """The identity residual x + z (K = I)."""
    return x + z


def as_general(streams):
    """A models.py stream view (blocks with x + block(x)) as (block, residual) steps."""
    return [(x0, [(lambda x, b=b: (b(x),), add) for b in blocks]) for x0, blocks in streams]


def as_identity(streams):
    """Back to models.py form: only for steps whose residual is `add` and one block output."""
    out = []
    for x0, steps in streams:
        assert all(residual is add for _, residual in steps)
        out.append((x0, [lambda x, b=b: b(x)[0] for b, _ in steps]))
    return out


def _dtype(module):
    return next(module.parameters()).dtype


# -----------------------------------------------------------------------------
# PostActResNet: x = relu(x + bn2(conv2(relu(bn1(conv1(x))))))


class BasicBlock(nn.Module):
    """The original (post-activation) ResNet basic block, no downsampling."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def branch(self, x):
        """The block side of the step, as a 1-tuple."""
        return (self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))),)

    @staticmethod
    def residual(x, z):
        return F.relu(x + z)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class PostActResNet(nn.Module):
    """A stack of post-activation basic blocks (BatchNorm in train mode), mean-pool, linear."""

    def __init__(self, channels=8, n_blocks=4, n_classes=5, size=6):
        super().__init__()
        self.channels, self.n_classes, self.size = channels, n_classes, size
        self.blocks = nn.ModuleList(BasicBlock(channels) for _ in range(n_blocks))
        self.fc = nn.Linear(channels, n_classes)

    def forward(self, x, targets):
        # x: (B, C, H, W)
        for blk in self.blocks:
            x = blk(x)
        return self._loss(x, targets)

    def _loss(self, x, targets):
        return F.cross_entropy(self.fc(x.mean((2, 3))), targets)

    def stream_view(self, x, targets):
        steps = [(blk.branch, blk.residual) for blk in self.blocks]
        return [(x, steps)], lambda states: self._loss(states[0][-1], targets)

    def example_inputs(self, batch_size=4):
        x = torch.randn(batch_size, self.channels, self.size, self.size, dtype=_dtype(self))
        return x, torch.randint(self.n_classes, (batch_size,))


# -----------------------------------------------------------------------------
# GRULoop: a hand-written GRU cell over T steps (the stream runs over time, weights shared)


class GRULoop(nn.Module):
    """h' = (1 - z) * n + z * h; learned h0; loss on h_T. x: (B, T, input_size)."""

    def __init__(self, input_size=4, hidden=16, T=32):
        super().__init__()
        self.input_size, self.hidden, self.T = input_size, hidden, T
        self.ih = nn.Linear(input_size, 3 * hidden)
        self.hh = nn.Linear(hidden, 3 * hidden)
        self.h0 = nn.Parameter(0.1 * torch.randn(hidden))
        self.head = nn.Linear(hidden, 1)

    def gates(self, x_t, h):
        """(z, n): the update gate and the candidate state, PyTorch's GRU equations."""
        i_r, i_z, i_n = self.ih(x_t).chunk(3, -1)
        h_r, h_z, h_n = self.hh(h).chunk(3, -1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return z, n

    @staticmethod
    def update(h, z, n):
        return (1 - z) * n + z * h

    def forward(self, x):
        h = self.h0.expand(x.size(0), -1)  # (B, hidden)
        for t in range(x.size(1)):
            z, n = self.gates(x[:, t], h)
            h = (1 - z) * n + z * h
        return self._loss(h)

    def _loss(self, h):
        return self.head(h).pow(2).mean()

    def stream_view(self, x):
        steps = [(lambda h, x_t=x[:, t]: self.gates(x_t, h), self.update) for t in range(x.size(1))]
        return [(self.h0.expand(x.size(0), -1), steps)], lambda states: self._loss(states[0][-1])

    def example_inputs(self, batch_size=4):
        return (torch.randn(batch_size, self.T, self.input_size, dtype=_dtype(self)),)


class GRUCellLoop(nn.Module):
    """GRULoop with torch.nn.GRUCell in forward; the stream view recomputes its gates.

    PyTorch's CPU gru_cell (aten/src/ATen/native/RNN.cpp) computes
        gi = linear(x, w_ih, b_ih), gh = linear(h, w_hh, b_hh), chunks r, z, n of each,
        r = sigmoid(h_r + i_r), z = sigmoid(h_z + i_z), n = tanh(i_n + h_n * r),
        h' = (h - n) * z + n
    and `gates` / `update` below repeat exactly those ops, so the view equals nn.GRUCell bit for
    bit (to float64 rounding on other builds). K = diag(z) either way.
    """

    def __init__(self, input_size=4, hidden=16, T=32, order=None):
        super().__init__()
        self.input_size, self.hidden, self.T = input_size, hidden, T
        self.order = list(range(T)) if order is None else list(order)   # the x[:, t] read
        self.cell = nn.GRUCell(input_size, hidden)
        self.h0 = nn.Parameter(0.1 * torch.randn(hidden))
        self.head = nn.Linear(hidden, 1)

    def gates(self, x_t, h):
        c, H = self.cell, self.hidden
        gi = F.linear(x_t, c.weight_ih, c.bias_ih)  # (B, 3H): chunks r, z, n
        gh = F.linear(h, c.weight_hh, c.bias_hh)
        # aten adds the r and z chunks in place and applies sigmoid_ to the strided (B, H) chunk
        # views; sigmoid of the same strided views here runs the same kernel loop (one row of H
        # at a time), which keeps even the vectorised-vs-scalar rounding of each element equal.
        s = gh + gi
        r = torch.sigmoid(s[:, :H])
        z = torch.sigmoid(s[:, H : 2 * H])
        n = torch.tanh(gi[:, 2 * H :] + gh[:, 2 * H :] * r)
        return z, n

    @staticmethod
    def update(h, z, n):
        return (h - n) * z + n

    def forward(self, x):
        h = self.h0.expand(x.size(0), -1)
        for t in self.order:
            h = self.cell(x[:, t], h)
        return self._loss(h)

    def _loss(self, h):
        return self.head(h).pow(2).mean()

    def stream_view(self, x):
        steps = [(lambda h, x_t=x[:, t]: self.gates(x_t, h), self.update) for t in self.order]
        return [(self.h0.expand(x.size(0), -1), steps)], lambda states: self._loss(states[0][-1])

    def example_inputs(self, batch_size=4):
        return (torch.randn(batch_size, self.T, self.input_size, dtype=_dtype(self)),)


# -----------------------------------------------------------------------------
# LSTMLoop: hand-written LSTM, a loss on h_t at every step


class LSTMLoop(nn.Module):
    """c_t = f * c_{t-1} + i * g,  h_t = o * tanh(c_t),  gates from (x_t, h_{t-1}).

    The stream cannot be c alone. Step t's gates read h_{t-1} = o_{t-1} * tanh(c_{t-1}), and
    o_{t-1} is a block output of step t-1 (it depends on h_{t-2}, ...): a block that took only
    c_{t-1} would have to read o_{t-1} (or h_{t-1}) from the previous step outside the stream,
    a second, non-residual channel between steps that Highway-BP's chain model has no place for.
    Two exact decompositions widen the state to one (B, 2H) tensor instead:

    view="ch" (default): x_t = [c_t, h_t]. Block t reads h_{t-1} (and x_t), returns (i, f, g, o);
        residual: c' = f * c + i * g, h' = o * tanh(c'). K = [[diag(f), 0], [diag(o tanh'(c') f), 0]]
        (rows c', h'; columns c, h): the h half has no residual path of its own, h' depends on c
        elementwise. Not diagonal, but each coordinate is a 2x2 block.
    view="co": x_t = [c_t, o_t]. Block t reads c_{t-1}, o_{t-1}, forms h_{t-1} = o_{t-1} *
        tanh(c_{t-1}) itself (block 0 reads the initial h0 as a side input instead: x_0's o half is
        a zero placeholder), returns (i, f, g, o); residual: [f * c + i * g, o]. K = diag(f, 0):
        the paper's "stream is c, K = diag(f)", with o carried along at K = 0.
    The head reads h_t from each state (x_t[:, H:] or o_t * tanh(c_t)), so per-step losses are
    injections e_t. Initial h0, c0 are learned (the prelude).
    """

    def __init__(self, input_size=4, hidden=16, T=12):
        super().__init__()
        self.input_size, self.hidden, self.T = input_size, hidden, T
        self.ih = nn.Linear(input_size, 4 * hidden)
        self.hh = nn.Linear(hidden, 4 * hidden)
        self.h0 = nn.Parameter(0.1 * torch.randn(hidden))
        self.c0 = nn.Parameter(0.1 * torch.randn(hidden))
        self.head = nn.Linear(hidden, 1)

    def gates(self, x_t, h):
        i, f, g, o = (self.ih(x_t) + self.hh(h)).chunk(4, -1)
        return torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)

    def forward(self, x):
        B = x.size(0)
        h, c = self.h0.expand(B, -1), self.c0.expand(B, -1)
        hs = []
        for t in range(x.size(1)):
            i, f, g, o = self.gates(x[:, t], h)
            c = f * c + i * g
            h = o * torch.tanh(c)
            hs.append(h)
        return self._loss(hs)

    def _loss(self, hs):
        return sum(self.head(h).pow(2).mean() for h in hs)

    def stream_view(self, x, view="ch"):
        B, H = x.size(0), self.hidden
        h0, c0 = self.h0.expand(B, -1), self.c0.expand(B, -1)
        xts = [x[:, t] for t in range(x.size(1))]
        if view == "ch":

            def residual(s, i, f, g, o):
                c = f * s[:, :H] + i * g
                return torch.cat([c, o * torch.tanh(c)], -1)

            steps = [(lambda s, x_t=x_t: self.gates(x_t, s[:, H:]), residual) for x_t in xts]
            x0 = torch.cat([c0, h0], -1)
            h_of = lambda s: s[:, H:]  # noqa: E731
        elif view == "co":

            def block(s, x_t, first):
                h = h0 if first else s[:, H:] * torch.tanh(s[:, :H])
                return self.gates(x_t, h)

            def residual(s, i, f, g, o):
                return torch.cat([f * s[:, :H] + i * g, o], -1)

            steps = [
                (lambda s, x_t=x_t, first=(t == 0): block(s, x_t, first), residual)
                for t, x_t in enumerate(xts)
            ]
            x0 = torch.cat([c0, torch.zeros_like(c0)], -1)
            h_of = lambda s: s[:, H:] * torch.tanh(s[:, :H])  # noqa: E731
        else:
            raise ValueError(view)
        return [(x0, steps)], lambda states: self._loss([h_of(s) for s in states[0][1:]])

    def example_inputs(self, batch_size=4):
        return (torch.randn(batch_size, self.T, self.input_size, dtype=_dtype(self)),)


def lstm_stream_from_step_1(model, x):
    """LSTMLoop as the pass sees it. Step 1's gates read h0, not c0, so it is no residual step
    of c and stays in the prelude; from there x_t = [c_t, h_t] (models_general's "ch" view)
    with K_t = [[f, 0], [o tanh'(c') f, 0]] per coordinate, and the loss on every h_t."""
    B, H = x.size(0), model.hidden
    h0, c0 = model.h0.expand(B, -1), model.c0.expand(B, -1)
    i, f, g, o = model.gates(x[:, 0], h0)
    c1 = f * c0 + i * g

    def residual(s, i, f, g, o):
        c = f * s[:, :H] + i * g
        return torch.cat([c, o * torch.tanh(c)], -1)

    steps = [(lambda s, x_t=x[:, t]: model.gates(x_t, s[:, H:]), residual)
             for t in range(1, x.size(1))]
    x0 = torch.cat([c1, o * torch.tanh(c1)], -1)
    return [(x0, steps)], lambda states: model._loss([s[:, H:] for s in states[0]])


# -----------------------------------------------------------------------------
# ElmanLoop: h = h + tanh(W h + U x_t), identity residual over time, a loss at every step


class ElmanLoop(nn.Module):
    def __init__(self, input_size=4, hidden=16, T=16):
        super().__init__()
        self.input_size, self.hidden, self.T = input_size, hidden, T
        self.W = nn.Linear(hidden, hidden)
        self.U = nn.Linear(input_size, hidden, bias=False)
        self.h0 = nn.Parameter(0.1 * torch.randn(hidden))
        self.head = nn.Linear(hidden, 1)

    def cell(self, x_t, h):
        return (torch.tanh(self.W(h) + self.U(x_t)),)

    def forward(self, x):
        h = self.h0.expand(x.size(0), -1)
        hs = []
        for t in range(x.size(1)):
            h = h + torch.tanh(self.W(h) + self.U(x[:, t]))
            hs.append(h)
        return self._loss(hs)

    def _loss(self, hs):
        return sum(self.head(h).pow(2).mean() for h in hs)

    def stream_view(self, x):
        steps = [(lambda h, x_t=x[:, t]: self.cell(x_t, h), add) for t in range(x.size(1))]
        return [(self.h0.expand(x.size(0), -1), steps)], lambda states: self._loss(states[0][1:])

    def example_inputs(self, batch_size=4):
        return (torch.randn(batch_size, self.T, self.input_size, dtype=_dtype(self)),)


# -----------------------------------------------------------------------------
# LayerScaleMLP and GatedMLP: residual MLP stacks with a scaled / gated residual


class MLPBranch(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear."""

    def __init__(self, d, hidden):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(self.ln(x))))


class LayerScaleMLP(nn.Module):
    """x = x + gamma_l * mlp(ln(x)), gamma_l a learned vector per block (init 0.1)."""

    def __init__(self, d=16, n_blocks=6, hidden=32):
        super().__init__()
        self.d = d
        self.blocks = nn.ModuleList(MLPBranch(d, hidden) for _ in range(n_blocks))
        self.scales = nn.ParameterList(nn.Parameter(0.1 * torch.ones(d)) for _ in range(n_blocks))
        self.head = nn.Linear(d, 1)

    def forward(self, x):
        for blk, gamma in zip(self.blocks, self.scales):
            x = x + gamma * blk(x)
        return self._loss(x)

    def _loss(self, x):
        return self.head(x).pow(2).mean()

    def stream_view(self, x, scale_in_block=False):
        """gamma_l in the residual (a residual parameter), or folded into the block (K = I)."""
        if scale_in_block:
            steps = [(lambda x, b=b, s=s: (s * b(x),), add) for b, s in zip(self.blocks, self.scales)]
        else:
            steps = [
                (lambda x, b=b: (b(x),), lambda x, z, s=s: x + s * z)
                for b, s in zip(self.blocks, self.scales)
            ]
        return [(x, steps)], lambda states: self._loss(states[0][-1])

    def example_inputs(self, batch_size=4):
        return (torch.randn(batch_size, self.d, dtype=_dtype(self)),)


class GatedBranch(nn.Module):
    """(a, z) = (sigmoid(gate(ln(x))), mlp(ln(x)))."""

    def __init__(self, d, hidden):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.gate = nn.Linear(d, d)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        h = self.ln(x)
        return torch.sigmoid(self.gate(h)), self.fc2(F.gelu(self.fc1(h)))


def gated(x, a, z):
    return a * x + z


class GatedMLP(nn.Module):
    """x = a * x + z, K = diag(a) with a produced by the block."""

    def __init__(self, d=16, n_blocks=6, hidden=32):
        super().__init__()
        self.d = d
        self.blocks = nn.ModuleList(GatedBranch(d, hidden) for _ in range(n_blocks))
        self.head = nn.Linear(d, 1)

    def forward(self, x):
        for blk in self.blocks:
            a, z = blk(x)
            x = a * x + z
        return self._loss(x)

    def _loss(self, x):
        return self.head(x).pow(2).mean()

    def stream_view(self, x):
        return [(x, [(blk, gated) for blk in self.blocks])], lambda states: self._loss(states[0][-1])

    def example_inputs(self, batch_size=4):
        return (torch.randn(batch_size, self.d, dtype=_dtype(self)),)


class ConditionedGateMLP(nn.Module):
    """x = x + act_l(W_l c + b_l) * mlp_l(x), c = silu(W_c y) shared: DiT's adaLN gate. Each
    block's gate is computed outside it, from its own Linear and the shared condition c (K = I).
    `acts` names each block's gate activation ("sigmoid" or "tanh")."""

    def __init__(self, d=8, d_c=5, n_blocks=5, hidden=16, acts=None):
        super().__init__()
        self.d, self.d_c = d, d_c
        self.acts = acts or ["sigmoid"] * n_blocks
        self.cond = nn.Linear(d_c, d_c)
        self.mlps = nn.ModuleList(MLPBranch(d, hidden) for _ in range(n_blocks))
        self.gates = nn.ModuleList(nn.Linear(d_c, d) for _ in range(n_blocks))
        self.head = nn.Linear(d, 1)

    def gate(self, l, c):
        return getattr(torch, self.acts[l])(self.gates[l](c))

    def forward(self, x, y):
        c = F.silu(self.cond(y))
        for l, mlp in enumerate(self.mlps):
            x = x + self.gate(l, c) * mlp(x)
        return self.head(x).pow(2).mean()

    def stream_view(self, x, y):
        c = F.silu(self.cond(y))
        steps = [(lambda h, mlp=mlp: (mlp(h),), lambda h, z, l=l: h + self.gate(l, c) * z)
                 for l, mlp in enumerate(self.mlps)]
        return [(x, steps)], lambda states: self.head(states[0][-1]).pow(2).mean()

    def example_inputs(self, batch_size=4):
        dt = _dtype(self)
        return (torch.randn(batch_size, self.d, dtype=dt), torch.randn(batch_size, self.d_c, dtype=dt))


# -----------------------------------------------------------------------------
# PostLNEncoder: BERT-style post-LN transformer encoder


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention, explicit matmuls, no dropout."""

    def __init__(self, d, n_head):
        super().__init__()
        self.n_head, self.d = n_head, d
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.qkv(x).split(self.d, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        att = F.softmax((q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1))), dim=-1)
        return self.proj((att @ v).transpose(1, 2).contiguous().view(B, T, C))


class FeedForward(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, 4 * d)
        self.proj = nn.Linear(4 * d, d)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


def ln_stats(s, eps):
    """LayerNorm's mean and 1 / sigma over the last axis (biased variance)."""
    mu = s.mean(-1, keepdim=True)
    var = (s - mu).pow(2).mean(-1, keepdim=True)
    return mu, torch.rsqrt(var + eps)


class PostLNLayer(nn.Module):
    """x = LN1(x + attn(x)); x = LN2(x + mlp(x)): two steps of the stream."""

    def __init__(self, d, n_head):
        super().__init__()
        self.attn = SelfAttention(d, n_head)
        self.ln_1 = nn.LayerNorm(d)
        self.mlp = FeedForward(d)
        self.ln_2 = nn.LayerNorm(d)

    def forward(self, x):
        x = self.ln_1(x + self.attn(x))
        x = self.ln_2(x + self.mlp(x))
        return x

    def steps(self, paper_algebra=False):
        pairs = [(self.attn, self.ln_1), (self.mlp, self.ln_2)]
        if not paper_algebra:
            # residual LN(x + z): its K is the full LayerNorm Jacobian in x (z held fixed)
            return [(lambda x, f=f: (f(x),), lambda x, z, ln=ln: ln(x + z)) for f, ln in pairs]

        # the paper's algebra: mu and rstd of x + z are block outputs, K = diag(w * rstd)
        def block(x, f, ln):
            z = f(x)
            return (z, *ln_stats(x + z, ln.eps))

        def residual(x, z, mu, rstd, ln):
            return (x + z - mu) * rstd * ln.weight + ln.bias

        return [
            (
                lambda x, f=f, ln=ln: block(x, f, ln),
                lambda x, z, mu, rstd, ln=ln: residual(x, z, mu, rstd, ln),
            )
            for f, ln in pairs
        ]


class PostLNEncoder(nn.Module):
    """Embeddings + LN (the prelude), n_layer post-LN layers (L = 2 n_layer), token head."""

    def __init__(self, vocab=32, d=32, n_head=2, n_layer=3, T=8):
        super().__init__()
        self.vocab, self.T = vocab, T
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(T, d)
        self.ln_emb = nn.LayerNorm(d)
        self.layers = nn.ModuleList(PostLNLayer(d, n_head) for _ in range(n_layer))
        self.lm_head = nn.Linear(d, vocab)

    def _embed(self, idx):
        pos = torch.arange(idx.size(1), device=idx.device)
        return self.ln_emb(self.wte(idx) + self.wpe(pos))

    def forward(self, idx, targets):
        x = self._embed(idx)  # (B, T, d)
        for layer in self.layers:
            x = layer(x)
        return self._loss(x, targets)

    def _loss(self, x, targets):
        logits = self.lm_head(x)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    def stream_view(self, idx, targets, paper_algebra=False):
        steps = [s for layer in self.layers for s in layer.steps(paper_algebra)]
        return [(self._embed(idx), steps)], lambda states: self._loss(states[0][-1], targets)

    def example_inputs(self, batch_size=4):
        idx = torch.randint(self.vocab, (batch_size, self.T))
        targets = torch.randint(self.vocab, (batch_size, self.T))
        return idx, targets


# -----------------------------------------------------------------------------
# PostNorm: x = norm(x + f(x)) with a LayerNorm (post-LN) or an RMSNorm; no stream_view (its
# test compares with exact autograd only)


class PostNorm(nn.Module):
    """x = norm(x + f(x)): BERT-style post-LN, or a post-RMSNorm (not a residual function the
    pass knows: its statistics read x + f(x) without a matmul in between)."""

    def __init__(self, post, n=3, d=8):
        super().__init__()
        self.fs = nn.ModuleList(nn.Linear(d, d) for _ in range(n))
        norm = nn.LayerNorm if post == "ln" else nn.RMSNorm
        self.norms = nn.ModuleList(norm(d) for _ in range(n))

    def forward(self, x):
        for f, norm in zip(self.fs, self.norms):
            x = norm(x + f(x))
        return x.pow(2).sum()


# -----------------------------------------------------------------------------
# StagedResNet: relu(x + f(x)) stages joined by a projection step relu(P x + f(x))


class StagedResNet(torch.nn.Module):
    """Two stages of relu(x + f(x)) blocks joined by a projection block relu(P x + f(x)) that
    halves the resolution: one stream, whose projection step has a dense K_l."""

    def __init__(self, c=4, n=2):
        super().__init__()
        nn = torch.nn

        def branch(cin, cout, stride=1):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.Tanh(),
                                 nn.Conv2d(cout, cout, 3, 1, 1))

        self.stage1 = nn.ModuleList(branch(c, c) for _ in range(n))
        self.down, self.proj = branch(c, 2 * c, 2), nn.Conv2d(c, 2 * c, 1, 2)
        self.stage2 = nn.ModuleList(branch(2 * c, 2 * c) for _ in range(n))

    def forward(self, x):
        for f in self.stage1:
            x = torch.relu(x + f(x))
        x = torch.relu(self.proj(x) + self.down(x))
        for f in self.stage2:
            x = torch.relu(x + f(x))
        return x.pow(2).mean()

    def stream_view(self, x):
        """The projection inside the residual function: the oracle's K_l^T is its VJP."""
        def relu_add(x, z):
            return torch.relu(x + z)
        steps = [(lambda x, f=f: (f(x),), relu_add) for f in self.stage1]
        steps.append((lambda x: (self.down(x),), lambda x, z: torch.relu(self.proj(x) + z)))
        steps += [(lambda x, f=f: (f(x),), relu_add) for f in self.stage2]
        return [(x, steps)], lambda states: states[0][-1].pow(2).mean()


# -----------------------------------------------------------------------------
# Streams through views: the model reshapes or transposes the stream between residual adds;
# stream_view writes the same function without the views (each block reshapes inside)


def mlp(d):
    return nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))


class FlattenedMLPs(nn.Module):
    """OPT's pattern: x (B, S, d) + a 3-D block, then the stream as (B*S, d) for a 2-D block,
    viewed back to 3-D after the add."""

    def __init__(self, n=2, d=8):
        super().__init__()
        self.a = nn.ModuleList(mlp(d) for _ in range(n))
        self.b = nn.ModuleList(mlp(d) for _ in range(n))

    def forward(self, x):
        for a, b in zip(self.a, self.b):
            x = x + a(x)
            shape = x.shape
            x = x.reshape(-1, x.size(-1))
            x = (x + b(x)).view(shape)
        return x.tanh().square().mean()

    def stream_view(self, x):
        steps = []
        for a, b in zip(self.a, self.b):
            steps.append((lambda x, a=a: (a(x),), add))
            steps.append((lambda x, b=b: (b(x.reshape(-1, x.size(-1))).view(x.shape),), add))
        return [(x, steps)], lambda states: states[0][-1].tanh().square().mean()

    def example_inputs(self, batch):
        return (torch.randn(batch, 5, self.a[0][0].normalized_shape[0], dtype=torch.float64),)


class TransposedBlocks(nn.Module):
    """A stream (B, S, d) that every other block adds to as (B, d, S): a channels-first
    convolution reading and writing the transposed stream, then transposed back."""

    def __init__(self, n=2, d=8):
        super().__init__()
        self.conv = nn.ModuleList(nn.Conv1d(d, d, 3, padding=1) for _ in range(n))
        self.mlp = nn.ModuleList(mlp(d) for _ in range(n))

    def forward(self, x):
        for conv, m in zip(self.conv, self.mlp):
            t = x.transpose(1, 2)
            x = (t + conv(torch.tanh(t))).transpose(1, 2)
            x = x + m(x)
        return x.sin().mean()

    def stream_view(self, x):
        steps = []
        for conv, m in zip(self.conv, self.mlp):
            steps.append((lambda x, c=conv: (c(torch.tanh(x.transpose(1, 2))).transpose(1, 2),),
                          add))
            steps.append((lambda x, m=m: (m(x),), add))
        return [(x, steps)], lambda states: states[0][-1].sin().mean()

    def example_inputs(self, batch):
        return (torch.randn(batch, 6, self.mlp[0][0].normalized_shape[0], dtype=torch.float64),)
