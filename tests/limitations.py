"""What the pass leaves to exact backprop, and why: one small model per limitation.

tests/test_limitations.py compiles each, checks that the report gives the stated reason and
that the gradients are still exact autograd's, and that README.md's "Limitations" section is
what `markdown()` renders from this list. After changing the list:

    python tests/limitations.py --write README.md
"""
import dataclasses
import re
import sys
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclasses.dataclass
class Limitation:
    what: str                       # what the user wrote
    happens: str                    # what the pass does about it
    reason: str                     # a phrase of the report's reason
    model: Callable[[], nn.Module]
    inputs: Callable[[], tuple]
    dynamic: bool = False
    options: dict = dataclasses.field(default_factory=dict)     # hbp_backend options


def mlp(d):
    return nn.Sequential(nn.Linear(d, 2 * d), nn.Tanh(), nn.Linear(2 * d, d))


class Stream(nn.Module):
    """x = step(x, block(x)) for `n` blocks; `step` says how a block joins the stream."""

    def __init__(self, step, n=3, d=6):
        super().__init__()
        self.blocks = nn.ModuleList(mlp(d) for _ in range(n))
        self.step = step

    def forward(self, x):
        for blk in self.blocks:
            x = self.step(x, blk)
        return x.pow(2).mean()


class ReadsEarlierBlock(nn.Module):
    """Block 2 reads block 1's hidden activation, not only its own input."""

    def __init__(self, d=6):
        super().__init__()
        self.a, self.b, self.c = mlp(d), mlp(d), mlp(d)

    def forward(self, x):
        h = torch.tanh(self.a[0](x))
        x = x + self.a[2](h)
        x = x + self.b(x) + 0.1 * h.sum(-1, keepdim=True)
        x = x + self.c(x)
        return x.pow(2).mean()


class Fork(nn.Module):
    """A side branch adds a block to x_1 but is not the stream (the stream goes on from x_1)."""

    def __init__(self, d=6):
        super().__init__()
        self.blocks = nn.ModuleList(mlp(d) for _ in range(3))
        self.side = mlp(d)

    def forward(self, x):
        x = x + self.blocks[0](x)
        side = x + self.side(x)
        x = x + self.blocks[1](x)
        x = x + self.blocks[2](x)
        return x.pow(2).mean() + side.pow(2).mean()


class Downsample(nn.Module):
    """Two residual stages joined by a downsampling that is no residual step."""

    def __init__(self, d=6):
        super().__init__()
        self.s1 = nn.ModuleList(mlp(d) for _ in range(2))
        self.down = nn.Linear(d, d + 2)
        self.s2 = nn.ModuleList(mlp(d + 2) for _ in range(2))

    def forward(self, x):
        for f in self.s1:
            x = x + f(x)
        x = self.down(x)
        for f in self.s2:
            x = x + f(x)
        return x.pow(2).mean()


class PackedGRU(nn.Module):
    """nn.GRU over variable-length sequences, packed."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(3, 5, batch_first=True)

    def forward(self, x, lengths):
        from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, h = self.rnn(packed)
        return pad_packed_sequence(out, batch_first=True)[0].pow(2).sum() + h.pow(2).sum()


class RNN(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.rnn = nn.LSTM(3, 5, **kwargs)

    def forward(self, x):
        return self.rnn(x)[0].pow(2).mean()


@torch.library.custom_op("hbp_tests::twice_tanh", mutates_args=())
def twice_tanh(x: torch.Tensor) -> torch.Tensor:
    """A custom op with a torch.library autograd formula (as transformers' grouped-mm fallback)."""
    return 2 * torch.tanh(x)


@twice_tanh.register_fake
def _(x):
    return torch.empty_like(x)


def _twice_tanh_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _twice_tanh_backward(ctx, g):
    (x,) = ctx.saved_tensors
    return 2 * g * (1 - torch.tanh(x) ** 2)


twice_tanh.register_autograd(_twice_tanh_backward, setup_context=_twice_tanh_setup)


def x6():
    return (torch.randn(4, 6, dtype=torch.float64),)


LIMITATIONS = [
    Limitation("a random op inside a block that transforms data (`torch.normal(h, s)`; on a GPU "
               "SDPA's fused dropout)", "the stream is cut before that block, which runs exact",
               "transforms data inside the block",
               lambda: Stream(lambda x, b: x + torch.normal(b(x), 0.1)), x6),
    Limitation("a custom op whose autograd formula torch.func cannot run (a `torch.library` op "
               "with `register_autograd`; Mixtral's grouped-mm expert fallback), with "
               "`recompute=True` or dynamic shapes, where the backward differentiates blocks "
               "with torch.func", "the stream is cut at that block, which runs exact",
               "torch.func cannot differentiate the block",
               lambda: Stream(lambda x, b: x + twice_tanh(b(x))), x6,
               options={"recompute": True}),
    Limitation("a block that reads another block's activations", "the stream is cut there",
               "stream cut before block", ReadsEarlierBlock, x6),
    Limitation("a residual add that forks off the stream (a side branch)",
               "the side branch runs exact", "residual add off the stream", Fork, x6),
    Limitation("a downsampling between two stages that is no residual step (ConvNeXt's, "
               "Swin's patch merging)", "the chain is split there: two streams, the "
               "downsampling runs exact", "split after x_L", Downsample, x6),
    Limitation("a function after the add that is neither pointwise nor LayerNorm "
               "(`rms_norm(x + f(x))`)", "every step is its own segment of one block, exact",
               "shorter than min_length",
               lambda: Stream(lambda x, b: F.rms_norm(x + b(x), (6,))), x6),
    Limitation("a single residual block", "exact (`min_length=2`)", "shorter than min_length",
               lambda: Stream(lambda x, b: x + b(x), n=1), x6),
    Limitation("`nn.LSTM(proj_size=...)`", "that layer runs exact (one op, no unrolling)",
               "proj_size", lambda: RNN(proj_size=2),
               lambda: (torch.randn(6, 2, 3, dtype=torch.float64),)),
    Limitation("`nn.GRU` / `nn.LSTM` on a `PackedSequence`", "Dynamo runs packing and the RNN "
               "call outside its graphs: exact backprop; the report lists the graph breaks",
               "marked as skipped", PackedGRU,
               lambda: (torch.randn(3, 7, 3, dtype=torch.float64), torch.tensor([7, 4, 2]))),
    Limitation("an RNN module over one time step", "that layer runs exact", "a single time step",
               lambda: RNN(), lambda: (torch.randn(1, 2, 3, dtype=torch.float64),)),
    Limitation("dynamic shapes (`dynamic=True`, `mark_dynamic`)",
               "Highway-BP, but the backward recomputes each block's forward (no saved split)",
               "symbolic sizes", lambda: Stream(lambda x, b: x + b(x)), x6, dynamic=True),
]


def reasons(report) -> list[str]:
    """Every reason a report gives for leaving something exact or degraded."""
    out = [s.reason for s in report.skipped]
    out += [g.recompute_reason for s in report.streams for g in s.groups if g.recompute_reason]
    out += [report.fallback_reason] if getattr(report, "fallback_reason", "") else []
    out += [s.split for s in report.streams if s.split]
    out += list(getattr(report, "graph_breaks", []))
    return out


def markdown() -> str:
    rows = ["| what you wrote | what the pass does | the report says (in part) |", "|---|---|---|"]
    rows += [f"| {x.what} | {x.happens} | \"{x.reason}\" |" for x in LIMITATIONS]
    return "\n".join(rows)


BEGIN, END = "<!-- limitations: generated by tests/limitations.py -->", "<!-- end limitations -->"


_SECTION = re.compile(re.escape(BEGIN) + r"\n(.*?)\n?" + re.escape(END), re.S)


def section(text: str) -> str:
    """The generated part of a README."""
    m = _SECTION.search(text)
    return m.group(1).rstrip("\n") if m else ""


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write"]:
        path = sys.argv[2]
        text = open(path).read()
        text = _SECTION.sub(lambda _: f"{BEGIN}\n{markdown()}\n{END}", text)
        open(path, "w").write(text)
    else:
        print(markdown())
