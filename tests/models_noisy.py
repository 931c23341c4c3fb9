"""Test models with random ops (dropout masks, rrelu, noise) in, before or after the stream.

Every model's `forward(*inputs)` returns a scalar loss. Their references are eager autograd or an
aot_eager compile under the same seed; DropMLP also has models.py's `stream_view` (oracle.py, with
the masks replayed through DropBlock.replay).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import MLPBlock


# -----------------------------------------------------------------------------
# NoisyBlocks: x + z blocks, block 2 a draw the backward cannot replay (tests/test_backend_api.py)


class NoisyBlocks(nn.Module):
    """Block 2 applies a randomized leaky ReLU: its draw happens inside the op that transforms
    the data, so the backward could not replay it (a dropout mask it could: test_dropout.py)."""

    def __init__(self, n=4, d=8):
        super().__init__()
        self.blocks = nn.ModuleList(MLPBlock(d, 16) for _ in range(n))

    def forward(self, x):
        for i, blk in enumerate(self.blocks):
            z = blk(x)
            if i == 2:
                z = torch.nn.functional.rrelu(z, training=True)
            x = x + z
        return x.pow(2).mean()


# -----------------------------------------------------------------------------
# DropMLP: two dropout masks per block, replayable by the oracle (tests/test_dropout.py)


P_HIDDEN, P_OUT = 0.3, 0.2


class DropBlock(nn.Module):
    """b(dropout(tanh(a(x)))) then dropout again: two masks per block. `replay` fixes them."""

    def __init__(self, d, native=False):
        super().__init__()
        self.a, self.b, self.native = nn.Linear(d, 2 * d), nn.Linear(2 * d, d), native
        self.replay = None

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.replay is not None:
            m1, m2 = self.replay
            return self.b(h * m1 / (1 - P_HIDDEN)) * m2 / (1 - P_OUT)
        h = F.dropout(h, P_HIDDEN, self.training)
        y = self.b(h)
        if self.native:                   # the fused op CUDA's F.dropout calls
            return torch.native_dropout(y, P_OUT, self.training)[0]
        return F.dropout(y, P_OUT, self.training)


class DropMLP(nn.Module):
    def __init__(self, d=8, n_blocks=4, native=False):
        super().__init__()
        self.d = d
        self.blocks = nn.ModuleList(DropBlock(d, native) for _ in range(n_blocks))
        self.head = nn.Linear(d, 1)

    def forward(self, x):
        for blk in self.blocks:
            x = x + blk(x)
        return self.head(x).pow(2).mean()

    def stream_view(self, x):
        return [(x, list(self.blocks))], lambda states: self.head(states[0][-1]).pow(2).mean()


# -----------------------------------------------------------------------------
# nn.TransformerEncoder with dropout, and NoisyMLP: a random op of each kind in the blocks,
# draws before and after the stream, steps of each residual kind (tests/test_randomness.py)


def encoder(norm_first, layers=3, d=16, dropout=0.1):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d, 2, 2 * d, dropout=dropout, batch_first=True,
                                       norm_first=norm_first)
    enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
    return nn.Sequential(enc, _Loss()).double().train()


class _Loss(nn.Module):
    def forward(self, h):
        return h.pow(2).mean()


class NoisyBlock(nn.Module):
    """Linear -> a random op -> Linear; `kind` picks the random op."""

    def __init__(self, d, kind):
        super().__init__()
        self.a, self.b, self.kind = nn.Linear(d, 2 * d), nn.Linear(2 * d, d), kind

    def forward(self, x):
        h = self.a(x)
        if self.kind == "dropout-transposed":         # a non-contiguous mask layout
            h = F.dropout(h.transpose(0, 1), 0.3, self.training).transpose(0, 1)
        elif self.kind == "rrelu":
            h = F.rrelu(h, training=self.training)
        elif self.kind == "bernoulli":
            h = h * torch.bernoulli(torch.full_like(h, 0.7))
        elif self.kind == "randn":
            h = torch.tanh(h) + 0.1 * torch.randn_like(h)
        elif self.kind == "jitter":                    # router jitter, uniform in [0.9, 1.1]
            h = torch.tanh(h) * torch.empty_like(h).uniform_(0.9, 1.1)
        elif self.kind == "alpha-dropout":
            h = F.alpha_dropout(torch.tanh(h), 0.2, self.training)
        elif self.kind == "sdpa-dropout":                # attention over the batch's rows
            q, k = h[..., :6], h[..., 6:]
            h = h + F.scaled_dot_product_attention(q, k, torch.tanh(h), dropout_p=0.2)
        return self.b(torch.tanh(h))


class NoisyMLP(nn.Module):
    """Random ops before, inside and after a stream whose steps are `residual`."""

    def __init__(self, kind, d=6, n_blocks=4, residual="identity"):
        super().__init__()
        self.blocks = nn.ModuleList(NoisyBlock(d, kind) for _ in range(n_blocks))
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(n_blocks))
        self.scale = nn.Parameter(torch.full((d,), 0.5))
        self.head, self.residual = nn.Linear(d, 1), residual

    def step(self, l, x, z):
        if self.residual == "gated":
            return torch.sigmoid(z) * x + z
        if self.residual == "relu":
            return torch.relu(x + z)
        if self.residual == "layerscale":
            return x + self.scale * z
        if self.residual == "postln":
            return self.norms[l](x + z)
        return x + z

    def forward(self, x):
        x = F.dropout(x, 0.1, self.training)           # a draw before the stream
        for l, blk in enumerate(self.blocks):
            x = self.step(l, x, blk(x))
        return self.head(F.dropout(x, 0.1, self.training)).pow(2).mean()
