"""Run a graph over a leading member axis: one batched computation for a whole group of blocks.

torch.func.vmap over a whole graph gives no say over how each op is batched, and vmap has no
batching rule for some native kernels (SDPA's fused forward and backward on CPU): it then loops
over the members, one kernel call per block. So the graph is batched node by node:

  - a node whose inputs carry no member axis runs as it is (shared weights, constants);
  - an op that treats the leading axis of every input as a batch (attention) runs ONCE on
    inputs whose member axis is folded into that batch axis, (n, B, ...) -> (n * B, ...):
    the native kernel, not a decomposition;
  - any other op runs under torch.func.vmap, whose batching rules turn mm into bmm,
    a convolution with per-member weights into a grouped convolution, and so on.

Values carry a flag: True where the value has the member axis at dim 0.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten, tree_unflatten

aten = torch.ops.aten


def _ops(*names):
    return {getattr(aten, n).default for n in names if hasattr(aten, n)}


# Every tensor argument and every batch-sized output has the batch axis first, and rows of
# that axis never interact: folding the member axis into it is exact.
FOLDABLE = _ops(
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention_for_cpu_backward",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_efficient_attention_backward",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_backward",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_cudnn_attention_backward",
)


def _fold(target, values, flags, spec, n: int):
    """Call `target` once with the member axis folded into each batched input's batch axis."""
    batch = next(v.shape[1] for v, f in zip(values, flags) if f)
    leaves = [v.reshape(n * batch, *v.shape[2:]) if f else v for v, f in zip(values, flags)]
    args, kwargs = tree_unflatten(leaves, spec)
    out = target(*args, **kwargs)

    def unfold(t):
        if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == n * batch:
            return t.unflatten(0, (n, batch)), True
        return t, False

    if isinstance(out, (tuple, list)):
        pairs = [unfold(t) for t in out]
        return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
    return unfold(out)


def _vmapped(target, values, flags, spec):
    """Call `target` under vmap over the batched tensors (in_dims 0), closing over the rest."""
    pos = [i for i, f in enumerate(flags) if f]

    absent = []                      # outputs a multi-output op leaves out (None, output_mask)

    def fn(*batched):
        leaves = list(values)
        for i, t in zip(pos, batched):
            leaves[i] = t
        args, kwargs = tree_unflatten(leaves, spec)
        out = target(*args, **kwargs)
        if isinstance(out, (tuple, list)):          # vmap returns tensors only
            absent[:] = [i for i, t in enumerate(out) if t is None]
            return tuple(t for t in out if t is not None)
        return out

    out = torch.func.vmap(fn)(*[values[i] for i in pos])
    if isinstance(out, (tuple, list)):
        out = list(out)
        for i in absent:
            out.insert(i, None)
        return tuple(out), tuple(isinstance(t, torch.Tensor) for t in out)
    return out, True


def _summed_matmul(node: fx.Node, env, flag):
    """sum over members of a batched mm(P, Q), as ONE mm with the member axis folded into the
    contracted axis: (a, n*R) @ (n*R, c), never materialising the (n, a, c) products; None
    if `node` (through transposes) is no such mm."""
    chain = []
    while node.target is aten.t.default:
        chain.append(node)
        node = node.args[0]
    if node.target is not aten.mm.default or not all(flag.get(a) is True for a in node.args):
        return None
    p, q = (env[a] for a in node.args)                  # (n, a, R), (n, R, c)
    out = p.permute(1, 0, 2).reshape(p.shape[1], -1) @ q.reshape(-1, q.shape[-1])
    for _ in chain:
        out = out.t()
    return out


def run_batched(gm: fx.GraphModule, args, batched, summed=()) -> tuple[tuple, tuple]:
    """Run gm over args; batched[i]: args[i] has the member axis at dim 0.

    Outputs whose index is in `summed` are summed over the members (a tied weight's gradient:
    its dW = mm(t(dh), a) becomes one mm over all members' rows). Returns (outputs, flags):
    which outputs carry the member axis."""
    env: dict = {}
    flag: dict = {}
    inputs = iter(zip(args, batched))
    n = next(a.shape[0] for a, b in zip(args, batched) if b)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node], flag[node] = next(inputs)
        elif node.op == "call_function":
            env[node], flag[node] = _run_node(node, env, flag, n)
        elif node.op == "output":
            outs, _ = tree_flatten(node.args[0])
            values = [env[o] if isinstance(o, fx.Node) else o for o in outs]
            flags = [isinstance(o, fx.Node) and _any(flag[o]) for o in outs]
            for i in summed:
                folded = _summed_matmul(outs[i], env, flag) if flags[i] else None
                values[i] = folded if folded is not None else \
                    values[i].sum(0) if flags[i] else values[i] * n
                flags[i] = False
            return tuple(values), tuple(flags)
        else:
            raise NotImplementedError(f"{node.op} node in a block backward")
    raise AssertionError("graph without output")


def _any(f) -> bool:
    return any(f) if isinstance(f, tuple) else bool(f)


def _run_node(node: fx.Node, env, flag, n: int):
    if node.target is operator.getitem:
        src, i = node.args
        f = flag[src]
        return env[src][i], (f[i] if isinstance(f, tuple) else f)
    leaves, spec = tree_flatten((node.args, node.kwargs))
    values = [env[a] if isinstance(a, fx.Node) else a for a in leaves]
    flags = [isinstance(a, fx.Node) and _any(flag[a]) for a in leaves]
    if not any(flags):
        args, kwargs = tree_unflatten(values, spec)
        return node.target(*args, **kwargs), False
    tensors = [f for v, f in zip(values, flags) if isinstance(v, torch.Tensor)]
    if node.target in FOLDABLE and all(tensors):
        return _fold(node.target, values, flags, spec, n)
    return _vmapped(node.target, values, flags, spec)
