"""Small test models for Highway-BP, each with a residual stream (or, for contrast, none).

Every model's `forward(*inputs)` returns a scalar loss. Every model also has
`stream_view(*inputs) -> (streams, head)`, the decomposition the eager oracle (oracle.py) works on:

- `streams` is a list of `(x0, blocks)`, one entry per residual stream. `x0` is the stream's
  initial state, computed from the inputs by the prelude (embeddings, input projections) and still
  attached to the prelude's autograd graph; for a model without a prelude it is the input itself.
  `blocks` is a list of callables with `z_l = blocks[l](x_l)` and `x_{l+1} = x_l + z_l`.
- `head(states)` takes one list `[x_0, ..., x_L]` per stream and returns the loss exactly as
  `forward` computes it. Gradients the head sends into any x_l (not only x_L) are the injections.

`stream_loss(streams, head)` runs that decomposition forward; tests check it equals `forward`
bit for bit. `example_inputs(batch_size)` draws random inputs of the model's dtype.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def stream_loss(streams, head):
    """Run every stream's blocks from its x0 (with autograd) and return head(states)."""
    states = []
    for x0, blocks in streams:
        xs = [x0]
        for blk in blocks:
            xs.append(xs[-1] + blk(xs[-1]))
        states.append(xs)
    return head(states)


def _dtype(module):
    return next(module.parameters()).dtype


class MLPBlock(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear: the expensive part z = block(x) of one residual step."""

    def __init__(self, d, hidden):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, hidden)
        self.gelu = nn.GELU()
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(self.gelu(self.fc1(self.ln(x))))


# -----------------------------------------------------------------------------
# ResMLP: the plainest residual stream, x_{l+1} = x_l + MLP(LN(x_l))


class ResMLP(nn.Module):
    """A deep narrow residual MLP: one stream of n_blocks steps, no prelude (x0 is the input)."""

    def __init__(self, d=16, hidden=32, n_blocks=8):
        super().__init__()
        self.d = d
        self.blocks = nn.ModuleList(MLPBlock(d, hidden) for _ in range(n_blocks))
        self.head = nn.Linear(d, 1)

    def forward(self, x):
        # x: (B, d)
        for blk in self.blocks:
            x = x + blk(x)
        return self._loss(x)

    def _loss(self, x):
        return self.head(x).pow(2).mean()

    def stream_view(self, x):
        return [(x, list(self.blocks))], lambda states: self._loss(states[0][-1])

    def example_inputs(self, batch_size=4):
        return (torch.randn(batch_size, self.d, dtype=_dtype(self)),)


class BlockStack(nn.Module):
    """x_{l+1} = x_l + blocks[l](x_l) around any blocks, loss mean(x_L^2): the plainest stream
    for a block under test (subclasses choose the blocks and example inputs)."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        for blk in self.blocks:
            x = x + blk(x)
        return x.pow(2).mean()

    def stream_view(self, x):
        return [(x, list(self.blocks))], lambda states: states[0][-1].pow(2).mean()


# -----------------------------------------------------------------------------
# GPT: a pre-LN transformer, nanoGPT style (no dropout, no weight init tricks)


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention with explicit matmuls, so the block is plain autograd ops."""

    def __init__(self, n_embd, n_head, block_size):
        super().__init__()
        assert n_embd % n_head == 0
        self.n_head = n_head
        self.n_embd = n_embd
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)  # q, k, v projections in one matmul
        self.c_proj = nn.Linear(n_embd, n_embd)
        # causal mask: position t attends to positions <= t only
        self.register_buffer(
            "bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size)
        )

    def forward(self, x):
        B, T, C = x.size()  # batch, sequence length, embedding dim (n_embd)
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, T)
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = att @ v  # (B, nh, T, T) x (B, nh, T, hs) -> (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return self.c_proj(y)


class MLP(nn.Module):
    """The transformer's position-wise feed-forward net, 4x wide."""

    def __init__(self, n_embd):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    """One transformer layer = two residual steps of the stream (attention, then MLP)."""

    def __init__(self, n_embd, n_head, block_size):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, block_size)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x

    def branches(self):
        """The two residual branches of forward, as the stream's blocks z = branch(x)."""
        return [lambda x: self.attn(self.ln_1(x)), lambda x: self.mlp(self.ln_2(x))]


class GPT(nn.Module):
    """A tiny pre-LN GPT; its stream has L = 2 * n_layer steps. tie_weights shares wte with lm_head."""

    def __init__(self, vocab=64, block_size=16, n_layer=4, n_head=2, n_embd=32, tie_weights=False):
        super().__init__()
        self.vocab = vocab
        self.block_size = block_size
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(vocab, n_embd),
                wpe=nn.Embedding(block_size, n_embd),
                h=nn.ModuleList(Block(n_embd, n_head, block_size) for _ in range(n_layer)),
                ln_f=nn.LayerNorm(n_embd),
            )
        )
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        if tie_weights:
            # nanoGPT's weight tying: a parameter used by both the prelude and the head
            self.transformer.wte.weight = self.lm_head.weight

    def forward(self, idx, targets):
        x = self._embed(idx)  # (B, T, n_embd)
        for block in self.transformer.h:
            x = block(x)
        return self._loss(x, targets)

    def _embed(self, idx):
        B, T = idx.size()
        assert T <= self.block_size
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)  # (T,)
        tok_emb = self.transformer.wte(idx)  # (B, T, n_embd)
        pos_emb = self.transformer.wpe(pos)  # (T, n_embd)
        return tok_emb + pos_emb

    def _loss(self, x, targets):
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    def stream_view(self, idx, targets):
        blocks = [branch for block in self.transformer.h for branch in block.branches()]
        return [(self._embed(idx), blocks)], lambda states: self._loss(states[0][-1], targets)

    def example_inputs(self, batch_size=4):
        idx = torch.randint(self.vocab, (batch_size, self.block_size))
        targets = torch.randint(self.vocab, (batch_size, self.block_size))
        return idx, targets


# -----------------------------------------------------------------------------
# TwoStreams: two independent chains that only meet in the head


class TwoStreams(nn.Module):
    """Two residual towers with their own weights, fed from one input, multiplied in the head."""

    def __init__(self, d=16, hidden=32, n_blocks=4):
        super().__init__()
        self.d = d
        self.proj_a = nn.Linear(d, d)
        self.proj_b = nn.Linear(d, d)
        self.blocks_a = nn.ModuleList(MLPBlock(d, hidden) for _ in range(n_blocks))
        self.blocks_b = nn.ModuleList(MLPBlock(d, hidden) for _ in range(n_blocks))
        self.head = nn.Linear(d, 1)

    def forward(self, x):
        # x: (B, d)
        a = self.proj_a(x)  # (B, d)
        b = self.proj_b(x)  # (B, d)
        for blk in self.blocks_a:
            a = a + blk(a)
        for blk in self.blocks_b:
            b = b + blk(b)
        return self._loss(a, b)

    def _loss(self, a, b):
        return self.head(a * b).pow(2).mean()

    def stream_view(self, x):
        streams = [(self.proj_a(x), list(self.blocks_a)), (self.proj_b(x), list(self.blocks_b))]
        return streams, lambda states: self._loss(states[0][-1], states[1][-1])

    def example_inputs(self, batch_size=4):
        return (torch.randn(batch_size, self.d, dtype=_dtype(self)),)


# -----------------------------------------------------------------------------
# InjectedHead: a second loss reads the stream mid-way, injecting a gradient at x_tap


class InjectedHead(nn.Module):
    """A residual MLP with an auxiliary head on x_tap, the state after the first `tap` blocks."""

    def __init__(self, d=16, hidden=32, n_blocks=6, tap=3):
        super().__init__()
        assert 0 <= tap <= n_blocks
        self.d = d
        self.tap = tap
        self.blocks = nn.ModuleList(MLPBlock(d, hidden) for _ in range(n_blocks))
        self.main_head = nn.Linear(d, 1)
        self.aux_head = nn.Linear(d, 1)

    def forward(self, x):
        # x: (B, d)
        x_tap = x  # tap == 0 reads the input itself
        for l, blk in enumerate(self.blocks):
            x = x + blk(x)
            if l + 1 == self.tap:
                x_tap = x
        return self._loss(x, x_tap)

    def _loss(self, x_last, x_tap):
        return self.main_head(x_last).pow(2).mean() + self.aux_head(x_tap).pow(2).mean()

    def stream_view(self, x):
        return [(x, list(self.blocks))], lambda states: self._loss(states[0][-1], states[0][self.tap])

    def example_inputs(self, batch_size=4):
        return (torch.randn(batch_size, self.d, dtype=_dtype(self)),)


# -----------------------------------------------------------------------------
# NoResidual: nothing for Highway-BP to do


class NoResidual(nn.Module):
    """A plain MLP (bias adds, LayerNorm, GELU) with no residual additions: no stream exists."""

    def __init__(self, d=16, hidden=32, n_layers=4):
        super().__init__()
        self.d = d
        dims = [d] + [hidden] * n_layers
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(d_in, d_out), nn.LayerNorm(d_out), nn.GELU())
            for d_in, d_out in zip(dims[:-1], dims[1:])
        )
        self.head = nn.Linear(hidden, 1)

    def forward(self, x):
        # x: (B, d)
        for layer in self.layers:
            x = layer(x)  # (B, hidden)
        return self.head(x).pow(2).mean()

    def stream_view(self, x):
        """No streams; the head ignores `states` and computes the whole loss from the input."""
        return [], lambda states: self(x)

    def example_inputs(self, batch_size=4):
        return (torch.randn(batch_size, self.d, dtype=_dtype(self)),)


# -----------------------------------------------------------------------------
# Llama: RMSNorm (an eps add), rotary embeddings (adds of rotated halves), SwiGLU. None of those
# adds is a residual step: the stream still has exactly 2 * n_layer steps.


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * w: its `+ eps` is an add that reads the stream."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RoPEAttention(nn.Module):
    """Causal attention with rotary position embeddings: q * cos + rotate_half(q) * sin."""

    def __init__(self, d, n_head, block_size):
        super().__init__()
        self.n_head, self.hs = n_head, d // n_head
        self.wq, self.wk, self.wv = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.wo = nn.Linear(d, d, bias=False)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, self.hs, 2).float() / self.hs))
        angles = torch.outer(torch.arange(block_size).float(), inv_freq)   # (T, hs/2)
        self.register_buffer("cos", torch.cat([angles.cos()] * 2, -1), persistent=False)
        self.register_buffer("sin", torch.cat([angles.sin()] * 2, -1), persistent=False)
        self.register_buffer("mask", torch.tril(torch.ones(block_size, block_size)).bool())

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (w(x).view(B, T, self.n_head, self.hs).transpose(1, 2)
                   for w in (self.wq, self.wk, self.wv))                     # (B, nh, T, hs)
        cos, sin = self.cos[:T].to(x.dtype), self.sin[:T].to(x.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        att = (q @ k.transpose(-2, -1)) / math.sqrt(self.hs)                 # (B, nh, T, T)
        att = att.masked_fill(~self.mask[:T, :T], float("-inf")).softmax(-1)
        return self.wo((att @ v).transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.w1, self.w3 = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class LlamaLayer(nn.Module):
    def __init__(self, d, n_head, block_size):
        super().__init__()
        self.attn_norm, self.mlp_norm = RMSNorm(d), RMSNorm(d)
        self.attn = RoPEAttention(d, n_head, block_size)
        self.mlp = SwiGLU(d, 2 * d)

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        x = x + self.mlp(self.mlp_norm(x))
        return x

    def branches(self):
        return [lambda x: self.attn(self.attn_norm(x)), lambda x: self.mlp(self.mlp_norm(x))]


class Llama(nn.Module):
    """A tiny Llama: embedding (no positions: RoPE), n_layer layers, RMSNorm, head."""

    def __init__(self, vocab=64, block_size=16, n_layer=3, n_head=2, d=32):
        super().__init__()
        self.vocab, self.block_size = vocab, block_size
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(LlamaLayer(d, n_head, block_size) for _ in range(n_layer))
        self.norm = RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx, targets):
        x = self.embed(idx)                                                  # (B, T, d)
        for layer in self.layers:
            x = layer(x)
        return self._loss(x, targets)

    def _loss(self, x, targets):
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    def stream_view(self, idx, targets):
        blocks = [b for layer in self.layers for b in layer.branches()]
        return [(self.embed(idx), blocks)], lambda states: self._loss(states[0][-1], targets)

    def example_inputs(self, batch_size=4):
        idx = torch.randint(self.vocab, (batch_size, self.block_size))
        targets = torch.randint(self.vocab, (batch_size, self.block_size))
        return idx, targets


# -----------------------------------------------------------------------------
# Norm variants: the shapes that norm-affine folding must handle, or leave alone


class NormFedBlock(nn.Module):
    """LayerNorm feeding `fan` linears whose outputs are multiplied (q, k, v-like), or, with
    side_path, a linear and a tanh of the norm's output (the norm feeds a non-linear: no fold)."""

    def __init__(self, d, fan=1, affine=True, bias=True, side_path=False):
        super().__init__()
        self.ln = nn.LayerNorm(d, elementwise_affine=affine, bias=bias)
        self.fcs = nn.ModuleList(nn.Linear(d, d) for _ in range(fan))
        self.side_path = side_path

    def forward(self, x):
        y = self.ln(x)
        z = self.fcs[0](y)
        for fc in self.fcs[1:]:
            z = z * fc(y)
        return z + y.tanh() if self.side_path else z


class NormStack(ResMLP):
    """A residual stream of NormFedBlocks over a (B, T, d) input (ResMLP's stream and head)."""

    def __init__(self, d=12, n_blocks=4, **block):
        super().__init__(d=d, n_blocks=0)
        self.blocks = nn.ModuleList(NormFedBlock(d, **block) for _ in range(n_blocks))

    def example_inputs(self, batch_size=3):
        return (torch.randn(batch_size, 5, self.d, dtype=_dtype(self)),)


# -----------------------------------------------------------------------------
# Streams for batched rounds (tests/test_batching.py): blocks of two structures, one block tied
# across all steps, attention through F.scaled_dot_product_attention


class Alternating(nn.Module):
    """A stream whose blocks alternate between two structures (hidden width 24 and 40)."""

    def __init__(self, d=16, n_blocks=6):
        super().__init__()
        self.d = d
        self.blocks = nn.ModuleList(MLPBlock(d, 24 if l % 2 == 0 else 40) for l in range(n_blocks))

    def forward(self, x):
        for blk in self.blocks:
            x = x + blk(x)
        return x.tanh().pow(2).mean()

    def stream_view(self, x):
        return [(x, list(self.blocks))], lambda states: states[0][-1].tanh().pow(2).mean()

    def example_inputs(self, batch_size=3):
        return (torch.randn(batch_size, self.d, dtype=torch.float64),)


class TiedSteps(nn.Module):
    """One block applied at every step (an RNN-like stream): its weights are shared captures."""

    def __init__(self, d=16, steps=5):
        super().__init__()
        self.d, self.steps = d, steps
        self.cell = MLPBlock(d, 24)
        self.head = nn.Linear(d, 1)

    def forward(self, x):
        for _ in range(self.steps):
            x = x + self.cell(x)
        return self.head(x).pow(2).mean()

    def stream_view(self, x):
        return [(x, [self.cell] * self.steps)], lambda st: self.head(st[0][-1]).pow(2).mean()

    def example_inputs(self, batch_size=3):
        return (torch.randn(batch_size, self.d, dtype=torch.float64),)


class SDPABlock(nn.Module):
    """Attention through F.scaled_dot_product_attention: a fused kernel vmap has no rule for."""

    def __init__(self, d=16, n_head=2):
        super().__init__()
        self.ln, self.qkv, self.proj, self.n_head = nn.LayerNorm(d), nn.Linear(d, 3 * d), \
            nn.Linear(d, d), n_head

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln(x)).split(C, -1)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class SDPAStack(BlockStack):
    def __init__(self, n_blocks=4):
        super().__init__(SDPABlock() for _ in range(n_blocks))

    def example_inputs(self, batch_size=3):
        return (torch.randn(batch_size, 8, 16, dtype=torch.float64),)


# -----------------------------------------------------------------------------
# What a torch.compile user does around the stream (tests/test_hostile.py,
# tests/test_robustness.py): checkpointed blocks, in-place adds, graph breaks, train-mode
# BatchNorm in the blocks or around the stream (BNOutside: no stream_view), SDPA with a learned
# mask (a block)


class CheckpointedMLP(ResMLP):
    """Every block under torch.utils.checkpoint."""

    def __init__(self, reentrant, n_blocks=4):
        super().__init__(n_blocks=n_blocks)
        self.reentrant = reentrant

    def forward(self, x):
        for blk in self.blocks:
            x = x + checkpoint(blk, x, use_reentrant=self.reentrant)
        return self._loss(x)


class InPlaceMLP(ResMLP):
    """torchvision's `out += identity`: the residual add in place on the block's output."""

    def forward(self, x):
        for blk in self.blocks:
            z = blk(x)
            z += x
            x = z
        return self._loss(x)


class InPlaceStreamMLP(ResMLP):
    """`x += block(x)`: the stream itself updated in place (the block reads x first)."""

    def forward(self, x):
        x = x.clone()
        for blk in self.blocks:
            x += blk(x)
        return self._loss(x)


class LearnedMaskAttention(torch.nn.Module):
    """SDPA whose additive mask is a parameter (a learned relative position bias, as Swin's)."""

    def __init__(self, d=8, heads=2, S=5):
        super().__init__()
        self.qkv, self.o = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
        self.bias = torch.nn.Parameter(0.1 * torch.randn(heads, S, S))
        self.heads = heads

    def forward(self, x):
        B, S, d = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.bias)
        return self.o(a.transpose(1, 2).reshape(B, S, d))


class BNResNet(BlockStack):
    """Pre-activation-style residual blocks with BatchNorm in train mode."""

    def __init__(self, n=4, d=8):
        super().__init__(
            nn.Sequential(nn.BatchNorm1d(d), nn.ReLU(), nn.Linear(d, d)) for _ in range(n))


class BreakMLP(ResMLP):
    """A graph break between two halves of the stream: Dynamo hands over two graphs."""

    def forward(self, x):
        for blk in self.blocks[:3]:
            x = x + blk(x)
        torch._dynamo.graph_break()
        for blk in self.blocks[3:]:
            x = x + blk(x)
        return self._loss(x)


class BreakInLoopMLP(ResMLP):
    """A graph break inside the layer loop: Dynamo runs the loop eagerly, nothing to rewrite."""

    def forward(self, x):
        for i, blk in enumerate(self.blocks):
            if i == 3:
                torch._dynamo.graph_break()
            x = x + blk(x)
        return self._loss(x)


class BNOutside(nn.Module):
    """Train-mode BatchNorm before and after the stream, plain residual blocks in between."""

    def __init__(self, n=3, d=8):
        super().__init__()
        self.pre, self.post = nn.BatchNorm1d(d), nn.BatchNorm1d(d)
        self.blocks = nn.ModuleList(nn.Sequential(nn.ReLU(), nn.Linear(d, d)) for _ in range(n))

    def forward(self, x):
        x = self.pre(x)
        for blk in self.blocks:
            x = x + blk(x)
        return self.post(x).pow(2).mean()


# -----------------------------------------------------------------------------
# Small graphs for the pipeline's passes one at a time (tests/test_analysis.py).

class ViewedMLPs(ResMLP):
    """ResMLP whose stream is flattened to (B * S, d) for every other block and viewed back:
    residual adds through views (push_views moves them onto the stream)."""

    def forward(self, x):                                # x: (B, S, d)
        for i, blk in enumerate(self.blocks):
            if i % 2:
                flat = x.reshape(-1, x.size(-1))         # (B * S, d)
                x = (flat + blk(flat)).view(x.shape)
            else:
                x = x + blk(x)
        return self._loss(x)

    def example_inputs(self, batch_size=2):
        return (torch.randn(batch_size, 3, self.d, dtype=_dtype(self)),)


class NormStemResMLP(ResMLP):
    """A BatchNorm (train mode) stem outside the stream, then the residual MLP blocks."""

    def __init__(self, d=16, hidden=32, n_blocks=3):
        super().__init__(d, hidden, n_blocks)
        self.stem = nn.BatchNorm1d(d)

    def forward(self, x):
        return super().forward(self.stem(x))


class GRUHead(nn.Module):
    """nn.GRU over T steps and a linear head on every step's output."""

    def __init__(self, n_in=3, hidden=4, layers=1):
        super().__init__()
        self.rnn = nn.GRU(n_in, hidden, num_layers=layers)
        self.head = nn.Linear(hidden, 1)

    def forward(self, xs):                               # xs: (T, B, n_in)
        out, _ = self.rnn(xs)
        return self.head(out).square().mean()

    def example_inputs(self, T=5, batch_size=2):
        return (torch.randn(T, batch_size, self.rnn.input_size, dtype=_dtype(self)),)
