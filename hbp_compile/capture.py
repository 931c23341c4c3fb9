"""Stage 1, capture: Dynamo's torch-IR graph -> a functional aten graph, traced under fake tensors.

Dynamo's IR is not functional (in-place ops, aliasing views) and speaks torch functions rather
than aten ops, so the pass never analyses it directly. Every private-API touch of capture lives
here, behind feature checks, so the package runs on torch 2.11 and 2.13 alike.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch._dispatch.python import enable_python_dispatcher
from torch.fx.experimental.proxy_tensor import make_fx


def _tracing_context():
    """Dynamo's TracingContext, or None outside torch.compile."""
    guards = getattr(torch, "_guards", None)
    tc = getattr(guards, "TracingContext", None)
    return tc.try_get() if tc is not None else None


def _backend_fake_mode(example_inputs):
    """The fake mode Dynamo made for the backend (it shares Dynamo's ShapeEnv)."""
    from torch._guards import detect_fake_mode

    return detect_fake_mode(example_inputs) or torch._subclasses.FakeTensorMode()


def _fakify(fake_mode, x):
    """Real example input -> fake tensor in the backend's mode, keeping its symbolic sizes.

    Dynamo hands the backend real tensors and a fresh FakeTensorMode sharing its ShapeEnv;
    fakifying with a new mode ("Mixing fake modes") or without Dynamo's symbolic context would
    lose the dynamic dimensions. This mirrors what aot_autograd does with its inputs.
    """
    if not isinstance(x, torch.Tensor):
        return x
    if isinstance(x, torch._subclasses.FakeTensor) and x.fake_mode is fake_mode:
        return x
    tc = _tracing_context()
    table = getattr(tc, "tensor_to_context", None) if tc is not None else None
    ctx = table[x] if table is not None and x in table else None
    if ctx is None:
        return fake_mode.from_tensor(x)
    return fake_mode.from_tensor(x, symbolic_context=ctx, source=getattr(ctx, "tensor_source", None))


def _functional_batch_norm(input, weight, bias, running_mean, running_var, training,
                           momentum, eps):
    """native_batch_norm as its functional form plus explicit copy_ into the running buffers."""
    aten = torch.ops.aten
    if running_mean is None or running_var is None:
        return aten._native_batch_norm_legit.no_stats(input, weight, bias, training, momentum, eps)
    if not training:
        return aten._native_batch_norm_legit_no_training.default(
            input, weight, bias, running_mean, running_var, momentum, eps)
    out, mean, rstd, new_mean, new_var = aten._native_batch_norm_legit_functional.default(
        input, weight, bias, running_mean, running_var, True, momentum, eps)
    running_mean.copy_(new_mean)
    running_var.copy_(new_var)
    return out, mean, rstd


def _capture_decompositions():
    """Ops whose aten form hides a mutation, rewritten so that functionalization sees it.

    native_batch_norm updates the running statistics in place without saying so in its schema.
    Written as _native_batch_norm_legit_functional, the update becomes the op's extra outputs
    plus a copy_ into each buffer: the analysis sees block side outputs instead of
    a hidden side effect, and the kernel (so the forward's numbers) stays the one an exact
    compile runs. F.dropout goes the way AOTAutograd takes it, through native_dropout, which
    stays one op (a block saves its mask output: groups.py), so that its kernel draws the
    random numbers the exact compile's draws, on every device.
    """
    return {torch.ops.aten.native_batch_norm.default: _functional_batch_norm,
            torch.ops.aten.dropout.default: _dropout}


def _dropout(input, p, train):
    """F.dropout as AOTAutograd traces it (torch._decomp: native_dropout when it drops), and so as
    an exact compile runs it. Left to ATen's CPU composite, it became bernoulli_ on a strided
    empty_like, which functionalization turns into a contiguous draw: other mask positions."""
    return torch.ops.aten.native_dropout(input, p, train)[0] if train and p != 0 \
        else input.clone()


def _functionalized(gm: fx.GraphModule):
    """Run `gm` under Python functionalization; input mutations become a final copy_.

    The Python FunctionalTensorMode (what AOTAutograd and export use) keeps symbolic sizes
    symbolic; torch.func.functionalize's C++ wrapper reads sizes through aten.size, which fake
    tensors answer with ints, specialising every dynamic dimension a view mentions.
    """
    from torch._functorch._aot_autograd.functional_utils import (
        from_fun, has_data_mutation, sync_functional_tensor, to_fun)
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    def run(*args):
        written = []
        with FunctionalTensorMode():
            fargs = [to_fun(a) for a in args]
            outs = fx.Interpreter(gm).run(*fargs)
            outs = torch.utils._pytree.tree_map(from_fun, outs)
            for a, fa in zip(args, fargs):
                if isinstance(a, torch.Tensor) and has_data_mutation(fa):
                    sync_functional_tensor(fa)
                    written.append((a, from_fun(fa)))
        for a, new in written:                       # outside the mode: recorded as copy_
            a.copy_(new)
        return outs

    return run


def functional_aten_graph(gm: fx.GraphModule, example_inputs) -> fx.GraphModule:
    """Trace `gm` to a functional aten graph (no mutations, no views of inputs) under fake mode."""
    fake_mode = _backend_fake_mode(example_inputs)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    # Most graphs mutate nothing: traced as they are, they come out functional already, in half
    # the time (functionalization is a third dispatch layer on every op). A graph that writes
    # (an in-place op, a buffer update) is traced again under functionalization.
    agm = None if _may_mutate(gm.graph) else \
        _trace(_interpreted(gm), example_inputs, fake_mode, placeholders)
    if agm is not None:
        _out_of_place(agm.graph)
    if agm is None or _mutates(agm.graph):
        agm = _trace(_functionalized(gm), example_inputs, fake_mode, placeholders)
    _rederive_rrelu(agm.graph)
    # Multi-output ops leave unused getitems behind; they would break the block closure check.
    agm.graph.eliminate_dead_code()
    agm.recompile()
    return agm


def _interpreted(gm: fx.GraphModule):
    """gm run node by node: each traced op keeps its node's metadata (nn_module_stack)."""
    def run(*args):
        return fx.Interpreter(gm).run(*args)
    return run


def _may_mutate(graph: fx.Graph) -> bool:
    """Might Dynamo's graph write to a tensor? (in-place methods and functions, item
    assignment, batch norm in training: its running statistics). A quick look that saves the
    plain trace where it would be thrown away; _mutates decides on the traced graph."""
    for n in graph.nodes:
        name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "")
        if n.op not in ("call_method", "call_function") or not isinstance(name, str):
            continue
        if (name.endswith("_") and not name.endswith("__")) or name.startswith("__i") \
                or name in ("setitem", "__setitem__") or "batch_norm" in name \
                or n.target in _INPLACE_OPERATORS:
            return True
    return False


_INPLACE_OPERATORS = {getattr(operator, f"i{op}") for op in (
    "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and", "or", "xor",
    "lshift", "rshift", "matmul")}


def _out_of_place(graph: fx.Graph) -> None:
    """In-place ops on private intermediates -> their out-of-place forms (what functionalization
    makes of them): torch's decompositions of gru_cell & co. write into their own temporaries
    (add_, sigmoid_). Only where nothing else can see the write: the written tensor is no
    input and no view, and has no views; any other write is left for functionalization."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for n in list(graph.nodes):
        pure = _pure_form(n)
        a = n.args[0] if pure is not None else None
        if not isinstance(a, fx.Node) or a.op != "call_function" or _returns_alias(a) \
                or any(_returns_alias(u) for u in a.users):
            continue
        later = [u for u in a.users if u is not n and order[u] > order[n]]
        n.target = pure
        for u in later:
            u.replace_input_with(a, n)


def _pure_form(n: fx.Node):
    """The out-of-place overload of an in-place op that writes its first argument only."""
    t = n.target
    if n.op != "call_function" or not isinstance(t, torch._ops.OpOverload) \
            or not t._schema.is_mutable or not t._opname.endswith("_") or not n.args:
        return None
    writes = [i for i, a in enumerate(t._schema.arguments)
              if a.alias_info is not None and a.alias_info.is_write]
    packet = getattr(torch.ops.aten, t._opname[:-1], None)
    return getattr(packet, t._overloadname, None) if writes == [0] else None


def _returns_alias(n: fx.Node) -> bool:
    """A view op's output (aliases its input without writing it)."""
    t = n.target
    return isinstance(t, torch._ops.OpOverload) and not t._schema.is_mutable and any(
        r.alias_info is not None for r in t._schema.returns)


def _mutates(graph: fx.Graph) -> bool:
    """Does the traced graph write to a tensor (an op whose schema marks an argument written)?"""
    return any(isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable
               for n in graph.nodes if n.op == "call_function")


def _trace(fn, example_inputs, fake_mode, placeholders) -> fx.GraphModule:
    """make_fx of fn on fresh fakes of the example inputs, the way AOTAutograd traces."""
    with fake_mode:
        fakes = [_fakify(fake_mode, t) for t in example_inputs]
        # Leaves that require grad keep it: composites decompose by it (matmul folds a 3-d
        # input into one mm only when no gradient needs it), as in the exact compile's trace.
        fakes = [f.detach().requires_grad_(t.requires_grad and f.dtype.is_floating_point)
                 if isinstance(f, torch.Tensor) else f for f, t in zip(fakes, example_inputs)]
    # With dynamic shapes, Python floats (LayerNorm eps, a scale) become 0-d tensor inputs read
    # by .item(); Dynamo's fake carries the SymFloat in item_memo and a fresh fake lacks it.
    for fake, node in zip(fakes, placeholders):
        ev = node.meta.get("example_value")
        if isinstance(fake, torch.Tensor) and getattr(ev, "item_memo", None) is not None:
            fake.item_memo = ev.item_memo
    # The Python dispatcher, as in AOTAutograd: composite ops (F.dropout) then decompose the way
    # the exact compile's trace does, not through ATen's C++ composites.
    with fake_mode, torch.enable_grad(), torch.fx.traceback.preserve_node_meta(), \
            enable_python_dispatcher():
        return make_fx(fn, decomposition_table=_capture_decompositions())(*fakes)


def _rederive_rrelu(graph: fx.Graph) -> None:
    """rrelu_with_noise_functional(x, ...)[0] -> x * noise_out, the op run on x.detach().

    Functionalization turns F.rrelu(training=True) into rrelu_with_noise_functional, whose
    derivative formula (torch 2.11-2.13) reads the noise *input*, an uninitialised buffer, not
    the noise it drew: AOTAutograd would differentiate the captured graph to garbage. The op's
    output is x * noise_out bit for bit, and that product differentiates right.
    """
    aten = torch.ops.aten
    op = getattr(aten, "rrelu_with_noise_functional", None)
    for node in list(graph.nodes):
        if op is None or node.target is not op.default:
            continue
        x = node.args[0]
        with graph.inserting_before(node):
            node.args = (graph.call_function(aten.detach.default, (x,)), *node.args[1:])
        for out in [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]:
            with graph.inserting_after(out):
                noise = graph.call_function(operator.getitem, (node, 1))
            with graph.inserting_after(noise):
                prod = graph.call_function(aten.mul.Tensor, (x, noise))
            prod.meta = dict(out.meta)
            noise.meta = {"val": node.meta["val"][1]} if "val" in node.meta else {}
            out.replace_all_uses_with(prod)
            graph.erase_node(out)
        node.args[0].meta["val"] = x.meta.get("val")


def joint_graph(gm: fx.GraphModule, example_inputs) -> fx.GraphModule:
    """The joint forward+backward aten graph of `gm` under exact backprop (for dumps).

    Outputs are the forward outputs followed by the gradients of every input that requires one,
    for cotangents of ones: the graph a reader compares the rewritten backward with.
    """
    fake_mode = _backend_fake_mode(example_inputs)
    with fake_mode:
        fakes = [_fakify(fake_mode, t) for t in example_inputs]
    wants_grad = [isinstance(t, torch.Tensor) and t.requires_grad for t in fakes]

    def joint(*args):
        primals = [a.detach().requires_grad_(True) if w else a for a, w in zip(args, wants_grad)]
        with torch.enable_grad():
            outs = fx.Interpreter(gm).run(*primals)
        flat = [o for o in torch.utils._pytree.tree_leaves(outs)
                if isinstance(o, torch.Tensor) and o.requires_grad]
        inputs = [p for p, w in zip(primals, wants_grad) if w]
        grads = torch.autograd.grad(flat, inputs, [torch.ones_like(o) for o in flat],
                                    allow_unused=True) if flat and inputs else ()
        return outs, grads

    with fake_mode, torch.fx.traceback.preserve_node_meta():
        return make_fx(joint)(*fakes)


def restore_native_batch_norm(graph: fx.Graph) -> int:
    """Put batch norms left outside every stream back to native_batch_norm; returns how many.

    Capture wrote them as _native_batch_norm_legit_functional plus copy_ into the running
    buffers (what the analysis needs inside blocks). Outside a stream that form breaks
    AOTAutograd's joint trace: its backward saves the buffers the copy_ then bumps. The native
    op updates the buffers itself, as in an exact compile.
    """
    aten = torch.ops.aten
    restored = 0
    for node in list(graph.nodes):
        if node.target is not aten._native_batch_norm_legit_functional.default:
            continue
        x, w, b, mean, var, training, momentum, eps = node.args
        outs = {u.args[1]: u for u in node.users if u.target is operator.getitem}
        writes = [w_ for i, buf in ((3, mean), (4, var)) if i in outs
                  for w_ in outs[i].users]
        if len(outs) != len(node.users) or any(
                w_.target is not aten.copy_.default or w_.args[0] not in (mean, var)
                for w_ in writes):
            continue
        with graph.inserting_before(node):
            native = graph.call_function(aten.native_batch_norm.default,
                                         (x, w, b, mean, var, training, momentum, eps))
        native.meta = dict(node.meta)
        for i, user in outs.items():
            if i < 3:
                user.replace_input_with(node, native)
        for w_ in writes:
            graph.erase_node(w_)
        for i in (3, 4):
            if i in outs:
                graph.erase_node(outs[i])
        graph.erase_node(node)
        restored += 1
    return restored
