"""Can a group's VJP run as one vmapped computation? Decide by tracing it, not by op lists.

vmap has no batching rule for some ops; it then silently loops over the batch (its "fallback"),
which inside a traced graph means one copy of the op per block: not batched at all. Tracing the
group's batched VJP at two batch sizes shows it: an op whose count grows with the batch size
was looped.
"""
from __future__ import annotations

import collections
from typing import Optional

import torch
import torch.fx as fx

from ..report import describe
from .ops import VMAP_DECOMPOSED, device_type


def vmappable(template: fx.GraphModule):
    """`template` as a callable that runs VMAP_DECOMPOSED ops through their decompositions."""
    from torch._decomp import get_decompositions

    decompositions = get_decompositions(list(VMAP_DECOMPOSED))

    class Decomposing(fx.Interpreter):
        def call_function(self, target, args, kwargs):
            fn = decompositions.get(target)
            if fn is not None:
                return fn(*args, **kwargs)
            return super().call_function(target, args, kwargs)

    def run(*args):
        return Decomposing(template).run(*args)

    return run


def _placeholder_vals(gm: fx.GraphModule) -> list:
    return [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]


def _vjp_at_ones(fn, args, diff):
    """A function of the `diff` inputs of fn(*args) returning fn's VJP at ones (to trace)."""
    def vjp(*primals):
        def f(*ps):
            full = list(args)
            for j, p in zip(diff, ps):
                full[j] = p
            return fn(*full)
        outs, vjp_fn = torch.func.vjp(f, *primals)
        return vjp_fn(tuple(torch.ones_like(o) for o in outs))
    return vjp


def _grad_at_ones(fn, args, diff):
    """_vjp_at_ones with torch.autograd.grad (how rewrite/partition.py differentiates)."""
    def grad(*primals):
        full, ps = list(args), [p.detach().requires_grad_() for p in primals]
        for j, p in zip(diff, ps):
            full[j] = p
        with torch.enable_grad():
            outs = [o for o in fn(*full) if o.requires_grad]
            return torch.autograd.grad(outs, ps, [torch.ones_like(o) for o in outs],
                                       allow_unused=True) if outs else ()
    return grad


def _traced_op_counts(gm: fx.GraphModule, vals, stacked, diff, n: int):
    """Op counts of the traced VJP (in the `diff` inputs) of vmap(gm) over n members, with
    the `stacked` inputs given per member and the others shared."""
    from torch.fx.experimental.proxy_tensor import make_fx

    args = [v.new_empty((n, *v.shape)) if s else v for v, s in zip(vals, stacked)]
    batched = torch.func.vmap(vmappable(gm), in_dims=tuple(0 if s else None for s in stacked))
    traced = make_fx(_vjp_at_ones(batched, args, diff))(*[args[j] for j in diff])
    return collections.Counter(n.target for n in traced.graph.nodes if n.op == "call_function")


def _looped_ops(gm: fx.GraphModule, count) -> Optional[str]:
    """Count a batched computation at 2 and 3 members: the ops that grew were looped by vmap."""
    two, three = count(2), count(3)
    grown = [t for t in three if three[t] > two[t]]
    ops = {n.target for n in gm.graph.nodes if isinstance(n.target, torch._ops.OpOverload)}
    looped = sorted(str(t) for t in grown if t in ops) or sorted(str(t) for t in grown)
    if looped:
        return f"no batching rule for {', '.join(looped[:3])} (vmap would loop over the blocks)"
    return None


def _saved_op_counts(part, vals, shared, n: int, n_x: int):
    """Op counts of the partition's backward run over n members (rewrite.batch.run_batched)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from ..rewrite.batch import run_batched

    bw_vals = [p.meta["val"] for p in part.bw.graph.nodes if p.op == "placeholder"]
    flags = [True] * len(bw_vals)
    for j, s in enumerate(shared):           # shared captures keep no member axis
        flags[n_x + j] = not s
    args = [v.new_empty((n, *v.shape)) if f else v for v, f in zip(bw_vals, flags)]
    traced = make_fx(lambda *a: run_batched(part.bw, a, flags)[0])(*args)
    return collections.Counter(n.target for n in traced.graph.nodes if n.op == "call_function")


def _fake_mode(vals):
    from torch._guards import detect_fake_mode
    return detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])


def batching_problem(group) -> Optional[str]:
    """Why this group's VJP cannot be one batched computation, or None if it can."""
    gm = group.template.gm
    vals = _placeholder_vals(gm)
    fake_mode = _fake_mode(vals)
    if fake_mode is None:
        return "no fake tensors to trace the batched VJP with"
    n_x, part = group.template.n_x, group.partition
    # x, and captures that differ per member, and the random draws after them are stacked
    stacked = [isinstance(v, torch.Tensor) and (j < n_x or j - n_x >= len(group.shared)
                                                or not group.shared[j - n_x])
               for j, v in enumerate(vals)]
    try:
        with fake_mode:
            if part is not None:
                return _looped_ops(gm, lambda n: _saved_op_counts(part, vals, group.shared,
                                                                  n, n_x))
            return _looped_ops(gm, lambda n: _traced_op_counts(gm, vals, stacked,
                                                               range(n_x), n))
    except Exception as e:                          # noqa: BLE001 - becomes the report's reason
        return f"vmap failed: {describe(e)}"


def capture_batching_problem(gm: fx.GraphModule, shared) -> Optional[str]:
    """Why a capture function (analysis.captures) cannot be differentiated vmapped, or None."""
    vals = _placeholder_vals(gm)
    fake_mode = _fake_mode(vals)
    if fake_mode is None:
        return "no fake tensors to trace the batched VJP with"
    diff = [j for j, v in enumerate(vals) if v.dtype.is_floating_point]
    try:
        with fake_mode:
            return _looped_ops(gm, lambda n: _traced_op_counts(gm, vals, [not s for s in shared],
                                                               diff, n))
    except Exception as e:                          # noqa: BLE001
        return f"vmap failed: {describe(e)}"


def vjp_problem(gm: fx.GraphModule, n_x: int = 1, recompute: bool = False) -> Optional[str]:
    """Why the backward cannot differentiate a block template, or None.

    Saved-activation groups differentiate a template once, with torch.autograd.grad as
    AOTAutograd does (rewrite/partition.py); recomputed ones (recompute=True, symbolic sizes)
    with torch.func.vjp, which also rejects a custom op whose derivative is an
    autograd.Function without setup_context (transformers' grouped-mm fallback in Mixtral's
    experts). An op without a derivative fails either way, and it would fail the whole graph
    at compile time: found here, it cuts the stream at that block instead."""
    from torch.fx.experimental.proxy_tensor import make_fx

    vals = _placeholder_vals(gm)
    fake_mode = _fake_mode(vals)
    if fake_mode is None:
        return None
    # x, and the inputs a gradient is asked of (parameters and what reads them; not buffers)
    diff = [j for j, v in enumerate(vals) if isinstance(v, torch.Tensor)
            and v.dtype.is_floating_point and (j < n_x or v.requires_grad)]
    symbolic = any(not isinstance(s, int) for v in vals if isinstance(v, torch.Tensor)
                   for s in v.shape)
    at_ones = _vjp_at_ones if recompute or symbolic else _grad_at_ones
    how = "torch.func" if recompute or symbolic else "autograd"

    def float_outputs(*args):
        return tuple(o for o in gm(*args)
                     if isinstance(o, torch.Tensor) and o.dtype.is_floating_point)

    try:
        with fake_mode:
            make_fx(at_ones(float_outputs, vals, diff))(*[vals[j] for j in diff])
    except Exception as e:                          # noqa: BLE001 - becomes the report's reason
        return f"{how} cannot differentiate the block: {describe(e)}"
    return None


def batching_decision(group, batched, strict: bool = False) -> tuple[bool, str]:
    """Batch this group's VJPs (the `batched` option: True, False or "auto")? And why not."""
    if group.size == 1:
        return False, "a single block"
    if not batched:
        return False, "batching disabled (batched=False)"
    if batched == "auto" and (why := _not_worth_batching(group)):
        return False, why
    reason = batching_problem(group)
    if reason is not None and strict:
        from ..config import HBPError
        raise HBPError(f"group of {group.size} blocks cannot be batched: {reason}")
    return reason is None, reason or ""


def _not_worth_batching(group) -> str:
    """batched="auto": why batching this group would cost more than it saves, or "".

    A batched round stacks the members' saved activations and (unless tied) their weights, a
    copy of each every step. On a GPU that copy is cheap next to the kernel launches it saves;
    on a CPU nothing is saved (the same arithmetic, one thread), so only tied-weight groups
    (an RNN cell over time: no weights to stack, and T copies of the VJP otherwise) batch."""
    x = group.template.gm.graph.find_nodes(op="placeholder")[0]
    if device_type(x) == "cuda" or any(group.shared):
        return ""
    return ("auto: on a CPU, stacking the members' weights and saved activations costs more "
            "than one batched VJP saves (batched=True forces it)")
