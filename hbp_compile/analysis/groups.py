"""Outline blocks into standalone templates and group the structurally identical ones.

Blocks with the same template (ops in the same order, same shapes, dtypes and strides of
activations and captures) form a group: one round of a group is one batched VJP.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Optional
import hashlib
import operator

import torch
import torch.fx as fx

from .blocks import Block
from .ops import MASKED_RANDOM_OPS, SUMMARY_OPS, VIEW_TO_RESHAPE
from .rules import POST_LN

aten = torch.ops.aten


def _meta_key(node, strides: bool = True) -> str:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if isinstance(val, torch.Tensor):
        return f"{val.dtype}{tuple(val.shape)}" + (f"{tuple(val.stride())}" if strides else "")
    if isinstance(val, (list, tuple)):
        return repr([f"{v.dtype}{tuple(v.shape)}" if isinstance(v, torch.Tensor) else repr(v)
                     for v in val])
    return type(val).__name__


@dataclasses.dataclass
class Template:
    """A block as a GraphModule (x, *captures, *randoms) -> (*zs, *side_outputs), its signature.

    `residual` is r as a GraphModule (x, *zs, *residual_caps) -> x_{l+1}; None for x + z.
    A block that draws random numbers (dropout) has two forms: `forward` (x, *captures) ->
    (*zs, *side_outputs, *randoms) draws them, and `gm` reads them as inputs, so every VJP of the
    backward sees the masks the forward used.
    """

    gm: fx.GraphModule
    signature: str
    summary: str
    n_z: int = 1
    residual: Optional[fx.GraphModule] = None
    forward: Optional[fx.GraphModule] = None
    n_random: int = 0
    n_x: int = 1                        # components of x_l (2 for an LSTM's (c, h))
    residual_forward: Optional[fx.GraphModule] = None  # r as the forward computes it (post-LN)


def _copy_body(block: Block, draw: bool) -> fx.GraphModule:
    """The block's body as a graph; random draws are kept and returned (draw) or read as inputs.

    A masked random op (native_dropout) returns its mask as the draw; read as an input, the
    op becomes input * mask * scale, what its kernels compute with that mask."""
    graph = fx.Graph()
    env = {x: graph.placeholder(name) for x, name in zip(block.xs, _x_names(block))}
    for j, cap in enumerate(block.captures):
        env[cap] = graph.placeholder(f"cap{j}")
    for node, ph in env.items():
        ph.meta["val"] = node.meta.get("val")
    masks = {}
    if not draw:
        for j, rnd in enumerate(block.randoms):
            ph = graph.placeholder(f"random{j}")
            ph.meta["val"] = _drawn_val(rnd)
            masks[rnd] = ph
    for node in block.body:
        if node in env:
            continue
        if node in masks and node.target in MASKED_RANDOM_OPS:
            env[node] = graph.call_function(apply_dropout_mask,
                                            (env[node.args[0]], masks[node], *node.args[1:2]))
            continue
        if node in masks:
            env[node] = masks[node]
            continue
        if node.target is aten.copy.default:          # no derivative in autograd (functional)
            env[node] = graph.call_function(copy_values, (env[node.args[0]], env[node.args[1]]))
            env[node].meta.update(node.meta)
            continue
        env[node] = graph.node_copy(node, lambda a: env[a])
        if env[node].target in VIEW_TO_RESHAPE:
            env[node].target = aten.reshape.default
    drawn = [_drawn(graph, env, r) for r in block.randoms] if draw else []
    outputs = [env[o] for o in list(block.zs) + block.side_outputs] + drawn
    graph.output(tuple(outputs))
    graph.eliminate_dead_code()            # what fed only the draws (empty_like) goes
    return fx.GraphModule(torch.nn.Module(), graph)


def apply_dropout_mask(x, mask, p):
    """native_dropout's output from its mask: x * mask * (1 / (1 - p)), as its kernels compute
    it (the CPU one as x.mul(mask).mul_(scale)), and the mask."""
    scale = 0.0 if p == 1 else 1.0 / (1.0 - p)
    return x * mask * scale, mask


def copy_values(dst, src):
    """aten.copy(dst, src), the functional form of dst.copy_(src), in ops autograd can
    differentiate: src's values, broadcast to dst's shape in dst's dtype and device (RWKV's
    state update writes into a slice of a buffer this way)."""
    return src.to(device=dst.device, dtype=dst.dtype).expand_as(dst).clone()


def _drawn(graph: fx.Graph, env: dict, rnd: fx.Node) -> fx.Node:
    """The value a random node draws: its output, or a masked op's mask."""
    if rnd.target in MASKED_RANDOM_OPS:
        return graph.call_function(operator.getitem, (env[rnd], 1))
    return env[rnd]


def _drawn_val(rnd: fx.Node):
    val = rnd.meta.get("val")
    return val[1] if rnd.target in MASKED_RANDOM_OPS else val


def outline(block: Block, known: Optional[dict] = None) -> Template:
    """Copy a block's body into its own graph; the signature names its structure, not its nodes.

    `known` maps signatures to templates built already: a block with one of those signatures
    gets that template (a group runs its first member's), and no graph is copied for it."""
    local = dict(zip(block.xs, _x_names(block)))
    local.update({cap: f"cap{j}" for j, cap in enumerate(block.captures)})
    # x's strides are left out: the backward stacks the states, so they arrive contiguous
    # (a stream starting from h0.expand(B, -1) still batches its first step with the rest)
    key = [(local[x], _meta_key(x, strides=False)) for x in block.xs] + \
        [(local[c], _meta_key(c)) for c in block.captures]
    for i, node in enumerate(block.body):
        local[node] = f"n{i}"
        args = fx.node.map_arg((node.args, node.kwargs), lambda a: local[a])
        key.append((str(node.target), repr(args), _meta_key(node)))
    outputs = list(block.zs) + block.side_outputs
    key.append(("out", tuple(local[o] for o in outputs), tuple(block.side_differentiable),
                tuple(local[r] for r in block.randoms)))
    residual = residual_forward = None
    if not block.step.identity:
        residual, residual_forward, rkey = _outline_residual(block)
        key.append(("residual", rkey))
    signature = hashlib.sha1(repr(key).encode()).hexdigest()[:12]
    if known is not None and signature in known:
        return known[signature]
    if residual is not None:           # a module only for the template (a member reuses it)
        residual = fx.GraphModule(torch.nn.Module(), residual)
    template = Template(_copy_body(block, draw=False), signature, _summary(block), len(block.zs),
                        residual, _copy_body(block, draw=True) if block.randoms else None,
                        len(block.randoms), len(block.xs), residual_forward)
    if known is not None:
        known[signature] = template
    return template


def _x_names(block: Block) -> list[str]:
    return ["x"] if len(block.xs) == 1 else [f"x{j}" for j in range(len(block.xs))]


def _outline_residual(block: Block):
    """r as a graph (x, *zs, *residual_caps) -> x_{l+1}, its forward form (None: r itself), and
    its structural key. The graph, not a module: most blocks only need the key."""
    step = block.step
    graph = fx.Graph()
    inputs = [*step.states, *step.zs, *step.residual_caps]
    names = _x_names(block) + [f"z{i}" for i in range(len(step.zs))] + \
        [f"rcap{i}" for i in range(len(step.residual_caps))]
    env, local = {}, {}
    for node, name in zip(inputs, names):
        env[node] = graph.placeholder(name)
        env[node].meta["val"] = node.meta.get("val")
        local[node] = name
    # pointwise and vmapped over stacked (contiguous) values: strides do not matter here
    key = [(name, _meta_key(node, strides=False)) for node, name in zip(inputs, names)]
    for i, node in enumerate(step.residual):
        env[node] = graph.node_copy(node, lambda a: env[a])
        local[node] = f"r{i}"
        args = fx.node.map_arg((node.args, node.kwargs), lambda a: local[a])
        key.append((str(node.target), repr(args), _meta_key(node, strides=False)))
    # one tensor x_{l+1}, or a tuple for a widened state
    graph.output(env[step.node] if not step.extra_outputs else tuple(env[o] for o in step.outputs))
    forward = None
    if POST_LN in step.node.meta:
        forward = _post_ln_forward(graph, step, env)
        key.append(("post-LN forward", repr(step.node.meta[POST_LN][0]), step.node.meta[POST_LN][3]))
    return graph, forward, key


def _post_ln_forward(graph: fx.Graph, step, env: dict) -> fx.GraphModule:
    """A split post-LN step's forward as the exact compile runs it: native_layer_norm(x + z)
    (x + z is r's add that reads x); the split algebra rounds differently and is the backward's."""
    shape, w, b, eps = step.node.meta[POST_LN]
    fwd = fx.Graph()
    fenv = {}
    for ph in graph.nodes:
        if ph.op == "placeholder":
            fenv[ph] = fwd.placeholder(ph.name)
            fenv[ph].meta["val"] = ph.meta.get("val")
    add = next(n for n in step.residual
               if n.target is aten.add.Tensor and n.args[0] is step.stream)
    u = fwd.node_copy(env[add], fenv.__getitem__)
    ln = fwd.call_function(aten.native_layer_norm.default,
                           (u, shape, fenv[env[w]] if w is not None else None,
                            fenv[env[b]] if b is not None else None, eps))
    fwd.output(fwd.call_function(operator.getitem, (ln, 0)))
    return fx.GraphModule(torch.nn.Module(), fwd)


def _summary(block: Block) -> str:
    """A short human description: op counts and the stream's layout."""
    ops = collections.Counter(
        getattr(n.target, "__name__", str(n.target)).split(".")[0] for n in block.body
        if n.op == "call_function" and n.target is not operator.getitem)
    heavy = [op for op in ops if op in SUMMARY_OPS]
    x = block.x.meta.get("val")
    shape = f"{tuple(x.shape)} {str(x.dtype).replace('torch.', '')}" if isinstance(x, torch.Tensor) else "?"
    drawn = f", {len(block.randoms)} random draw(s) saved for the backward" if block.randoms else ""
    return f"{len(block.body)} ops ({', '.join(heavy) or 'elementwise'}), x {shape}{drawn}"


@dataclasses.dataclass
class Group:
    """Structurally identical blocks of one stream; each round runs them as one computation."""

    template: Template
    members: list[int]              # positions l of the member blocks in the stream
    shared: list[bool]              # per capture: the same value in every member (tied weights)
    residual_shared: list[bool] = dataclasses.field(default_factory=list)  # same, for r's
    partition: object = None        # rewrite.partition.Partition: the saving fw / bw split
    recompute_reason: str = ""      # why the backward recomputes the forward (no partition)
    capture: object = None          # analysis.captures.CaptureFn: members' private captures

    @property
    def size(self) -> int:
        return len(self.members)


def group_blocks(blocks: list[Block], templates: list[Template]) -> list[Group]:
    """Group blocks by template signature, in order of first appearance."""
    by_sig: dict[str, list[int]] = {}
    for l, t in enumerate(templates):
        by_sig.setdefault(t.signature, []).append(l)
    groups = []
    for members in by_sig.values():
        def shared(values_of):
            n = len(values_of(blocks[members[0]]))
            return [len(members) > 1 and len({values_of(blocks[l])[j] for l in members}) == 1
                    for j in range(n)]

        groups.append(Group(templates[members[0]], members, shared(lambda b: b.captures),
                            shared(lambda b: b.step.residual_caps)))
    return groups
