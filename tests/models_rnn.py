"""Test models over time built from PyTorch's RNN modules or stacked hand-written GRU layers.

The models of tests/test_rnn_modules.py (nn.RNN / nn.GRU / nn.LSTM and a loss) and
tests/test_stacked_rnn.py (GRU layers stacked with residual adds between layers). Their oracles
work on the modules' weights (oracle_rnn.module_highway) or layer by layer, not through a
`stream_view`: these models have none. Hand-written RNN loops with a `stream_view` are in
models_general.py.
"""
import torch
import torch.nn as nn


# -----------------------------------------------------------------------------
# RNNWithLoss: nn.RNN / nn.GRU / nn.LSTM and a loss on every step's output or on h_n only


class RNNWithLoss(nn.Module):
    """The RNN module and a loss on its outputs (every step's output, or only h_n)."""

    def __init__(self, kind, layers, bidir, batch_first, dropout, every_step, I=3, H=5,
                 nonlinearity="tanh"):
        super().__init__()
        extra = {"nonlinearity": nonlinearity} if kind == "RNN" else {}
        self.rnn = getattr(nn, kind)(I, H, num_layers=layers, bidirectional=bidir,
                                     batch_first=batch_first, dropout=dropout, **extra)
        self.every_step = every_step

    def forward(self, x, hx=None):
        out, h_n = self.rnn(x, hx)
        return loss_of(out, h_n, self.every_step)


def loss_of(out, h_n, every_step):
    h = h_n[0] if isinstance(h_n, tuple) else h_n
    w = torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)
    step = (torch.tanh(out) * w).sum() if every_step else 0
    extra = (h_n[1] ** 2).sum() if isinstance(h_n, tuple) else 0
    return step + (h * h.roll(1, -1)).sum() + extra


# -----------------------------------------------------------------------------
# StackedGRU: GRU layers over time, u^{l+1}_t = u^l_t + h_t between layers (the paper's
# 3-layer GRU): one stream over time per layer, the between-layer adds outside it


class GRULayer(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.ih, self.hh = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, 3 * hidden)
        self.h0 = nn.Parameter(0.1 * torch.randn(hidden))

    def gates(self, u_t, h):
        i_r, i_z, i_n = self.ih(u_t).chunk(3, -1)
        h_r, h_z, h_n = self.hh(h).chunk(3, -1)
        r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
        return z, torch.tanh(i_n + r * h_n)

    @staticmethod
    def update(h, z, n):
        return (1 - z) * n + z * h


class StackedGRU(nn.Module):
    """u^0_t = proj(x_t); layer l: h_t = GRU(u^l_t, h_{t-1}); u^{l+1}_t = u^l_t + h_t.
    Loss on the top layer's output at the last step."""

    def __init__(self, input_size=3, hidden=8, layers=3, T=6):
        super().__init__()
        self.T, self.input_size = T, input_size
        self.proj = nn.Linear(input_size, hidden)
        self.layers = nn.ModuleList(GRULayer(hidden) for _ in range(layers))
        self.head = nn.Linear(hidden, 1)

    def forward(self, x):
        us = [self.proj(x[:, t]) for t in range(x.size(1))]
        for layer in self.layers:
            h = layer.h0.expand(x.size(0), -1)
            outs = []
            for u_t in us:
                h = layer.update(h, *layer.gates(u_t, h))
                outs.append(h)
            us = [u_t + h_t for u_t, h_t in zip(us, outs)]
        return self.head(us[-1]).pow(2).mean()

    def example_inputs(self, batch_size=3):
        return (torch.randn(batch_size, self.T, self.input_size, dtype=self.proj.weight.dtype),)
