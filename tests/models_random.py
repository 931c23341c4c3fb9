"""Residual architectures drawn at random (tests/test_properties.py), each with its stream view.

A spec is a list of steps; each step has
  kind   "identity" x + z | "gated" a * x + z (a from the block) | "relu" relu(x + z) |
         "layerscale" x + g * z (g a residual parameter) | "postln" LN(x + z), in the paper's
         algebra in the view (mu, rstd are block outputs), as the pass rewrites it
  body   "mlp" | "attn" (one head, explicit matmuls) | "conv" (Conv1d over the sequence)
  share  None, or an earlier step whose body module this step reuses (tied weights)
  frozen the body's first weight does not require grad
  tap    a second head reads x_{l+1} (a gradient injected mid-stream)
  side   the body reads the side input c as well as x
  after  None, or what follows the step: "view" (x through a reshape and back), "proj" (a
         Linear d -> d: the chain is split there), "fork" (a side branch x + f(x) feeding the
         loss off the stream)
The state is (B, T, d); the head reads the last state through an integer buffer (a position
permutation). Same contract as models_general.py: forward(x, c) -> loss, stream_view(x, c).
"""
import dataclasses
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from models_general import ln_stats

KINDS = ("identity", "gated", "relu", "layerscale", "postln")
BODIES = ("mlp", "attn", "conv")


@dataclasses.dataclass(frozen=True)
class StepSpec:
    kind: str
    body: str
    share: Optional[int] = None
    frozen: bool = False
    tap: bool = False
    side: bool = False
    after: Optional[str] = None


AFTERS = (None, "view", "proj", "fork")


class Body(nn.Module):
    def __init__(self, body: str, d: int):
        super().__init__()
        self.kind = body
        self.ln = nn.LayerNorm(d)
        if body == "mlp":
            self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        elif body == "attn":
            self.fc1, self.fc2 = nn.Linear(d, 3 * d), nn.Linear(d, d)
        else:
            self.fc1, self.fc2 = nn.Conv1d(d, d, 3, padding=1), nn.Linear(d, d)

    def forward(self, x):                                   # (B, T, d) -> (B, T, d)
        h = self.ln(x)
        if self.kind == "mlp":
            return self.fc2(F.gelu(self.fc1(h)))
        if self.kind == "attn":
            q, k, v = self.fc1(h).chunk(3, -1)
            att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)), -1)
            return self.fc2(att @ v)
        return self.fc2(torch.tanh(self.fc1(h.transpose(1, 2)).transpose(1, 2)))


class Step(nn.Module):
    """One residual step's parameters: its body (maybe another step's), gate, scale, norm."""

    def __init__(self, spec: StepSpec, body: Body, d: int):
        super().__init__()
        self.spec, self.body = spec, body
        if spec.kind == "gated":
            self.gate = nn.Linear(d, d)
        elif spec.kind == "layerscale":
            self.scale = nn.Parameter(0.5 + 0.1 * torch.randn(d))
        elif spec.kind == "postln":
            self.norm = nn.LayerNorm(d)
            with torch.no_grad():
                self.norm.weight.add_(0.1 * torch.randn(d))
                self.norm.bias.add_(0.1 * torch.randn(d))
        if spec.tap:
            self.tap = nn.Linear(d, 1)
        if spec.after in ("proj", "fork"):
            self.after = nn.Linear(d, d)

    def transition(self, x):
        """What follows the step on the stream (view, projection) or beside it (fork)."""
        if self.spec.after == "view":
            B, T, d = x.shape
            return x.reshape(B, T * d).reshape(B, T, d), None
        if self.spec.after == "proj":
            return self.after(x), None
        if self.spec.after == "fork":
            return x, x + torch.tanh(self.after(x))
        return x, None

    def zs(self, x, c):
        """The block: everything that depends on x but r."""
        z = self.body(x + c if self.spec.side else x)
        if self.spec.kind == "gated":
            return torch.sigmoid(self.gate(x)), z
        if self.spec.kind == "postln":
            mu, rstd = ln_stats(x + z, self.norm.eps)
            return z, mu, rstd
        return (z,)

    def residual(self, x, *zs):
        kind = self.spec.kind
        if kind == "identity":
            return x + zs[0]
        if kind == "gated":
            a, z = zs
            return a * x + z
        if kind == "relu":
            return torch.relu(x + zs[0])
        if kind == "layerscale":
            return x + self.scale * zs[0]
        z, mu, rstd = zs
        return (x + z - mu) * rstd * self.norm.weight + self.norm.bias

    def forward(self, x, c):
        """The step as a user writes it."""
        kind = self.spec.kind
        z = self.body(x + c if self.spec.side else x)
        if kind == "gated":
            return torch.sigmoid(self.gate(x)) * x + z
        if kind == "relu":
            return torch.relu(x + z)
        if kind == "layerscale":
            return x + self.scale * z
        if kind == "postln":
            return self.norm(x + z)
        return x + z


class RandomResidualNet(nn.Module):
    def __init__(self, specs: list, d: int = 8, T: int = 3):
        super().__init__()
        self.d, self.T = d, T
        bodies = []
        for s in specs:
            shared = s.share is not None and specs[s.share].body == s.body
            bodies.append(bodies[s.share] if shared else Body(s.body, d))
            if s.frozen:
                bodies[-1].fc1.weight.requires_grad_(False)
        self.steps = nn.ModuleList(Step(s, b, d) for s, b in zip(specs, bodies))
        self.head = nn.Linear(d, 1)
        self.register_buffer("order", torch.randperm(T))    # an integer buffer

    def _loss(self, last, outputs, forks):
        """Head on the last state (positions permuted by the int buffer), taps on the steps'
        outputs, and the side branches."""
        loss = self.head(last.index_select(1, self.order)).pow(2).mean()
        for step, y in zip(self.steps, outputs):
            if step.spec.tap:
                loss = loss + 0.3 * step.tap(y).pow(2).mean()
        for f in forks:
            loss = loss + 0.2 * f.pow(2).mean()
        return loss

    def forward(self, x, c):
        outputs, forks = [], []
        for step in self.steps:
            y = step(x, c)
            outputs.append(y)
            x, fork = step.transition(y)
            if fork is not None:
                forks.append(fork)
        return self._loss(x, outputs, forks)

    def plain(self) -> bool:
        """No view or projection between steps: one stream, and the oracle's view applies."""
        return all(s.spec.after in (None, "fork") for s in self.steps)

    def lone_final_norm(self) -> bool:
        """A last post-LN step whose neighbour is no post-LN step reads as x + z followed by
        the head's final norm (GPT's ln_f), which is how the pass takes it."""
        kinds = [s.spec.kind for s in self.steps]
        return kinds[-1] == "postln" and (len(kinds) == 1 or kinds[-2] != "postln")

    def stream_view(self, x, c):
        """One stream (plain() models): steps in the pass's algebra, the rest in the head."""
        steps = [(lambda h, s=s: s.zs(h, c), s.residual) for s in self.steps]
        last = self.steps[-1]
        lone = self.lone_final_norm()
        if lone:
            steps[-1] = (lambda h: (last.body(h + c if last.spec.side else h),),
                         lambda h, z: h + z)

        def head(states):
            outputs = list(states[0][1:])
            if lone:
                outputs[-1] = last.norm(outputs[-1])
            forks = [s.transition(y)[1] for s, y in zip(self.steps, outputs)
                     if s.spec.after == "fork"]
            return self._loss(outputs[-1], outputs, forks)
        return [(x, steps)], head

    def example_inputs(self, batch_size=2):
        dt = self.head.weight.dtype
        return (torch.randn(batch_size, self.T, self.d, dtype=dt),
                0.5 * torch.randn(batch_size, self.T, self.d, dtype=dt))
