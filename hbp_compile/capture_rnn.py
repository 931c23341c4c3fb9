"""Stage 1 for RNN modules: let Dynamo trace nn.RNN / nn.GRU / nn.LSTM, then lower each call to
one hbp::rnn_layer op per layer and direction (exact backprop until the rewrite takes a layer).

Dynamo refuses RNN modules unless torch._dynamo.config.allow_rnn is set, and then hands the
backend one torch.gru / torch.lstm / torch.rnn_tanh / torch.rnn_relu call. Tracing that call
to aten unrolls it over time (compile time grows with T; float32 LSTMs on a CPU crash
AOTAutograd). Lowered here, before capture, a module call becomes layers of opaque ops:

    input -> [batch_first: transpose] -> layer 0 (forward, reverse: flip, op, flip) -> cat
          -> dropout (train, between layers) -> layer 1 ... -> output; h_n = stack of h_T

which is the order in which ATen runs a multi-layer RNN, so the dropout draws are the same.
"""
from __future__ import annotations

import warnings

import torch
import torch.fx as fx

from . import rnn_ops                            # noqa: F401 - registers torch.ops.hbp.*
from .rewrite.group_vjp import annotate

RNN_FUNCTIONS = {torch.gru: "gru", torch.lstm: "lstm", torch.rnn_tanh: "rnn_tanh",
                 torch.rnn_relu: "rnn_relu"}


# ---------------------------------------------------------------------------------------
# Tracing: allow_rnn, for frames that an hbp backend compiles and no other.

def _is_hbp(compiler_fn) -> bool:
    """Does this (wrapped) Dynamo compiler function lead to an hbp backend with RNN tracing on?"""
    from . import backend as _backend
    for _ in range(8):                    # WrapBackendDebug -> _TorchCompileWrapper -> ours
        if compiler_fn is None:
            return False
        options = (getattr(compiler_fn, "kwargs", None) or {}).get("options") or {}
        if isinstance(options, dict) and options.get("rnn_modules") is False:
            return False                  # backend="hbp", options={"rnn_modules": False}
        if isinstance(compiler_fn, _backend.HBPBackend):
            return compiler_fn.config.rnn_modules
        if getattr(compiler_fn, "__name__", "") == "dynamo_backend" and \
                getattr(compiler_fn, "__module__", "").startswith("hbp_compile"):
            return True
        compiler_fn = getattr(compiler_fn, "_torchdynamo_orig_backend", None) or \
            getattr(compiler_fn, "compiler_fn", None)
    return False


def _current_frame():
    """The InstructionTranslator of the frame Dynamo is tracing, or None."""
    from torch._dynamo.symbolic_convert import InstructionTranslator
    try:
        return InstructionTranslator.current_tx()
    except Exception:                     # noqa: BLE001 - not tracing a frame
        return None


def _for_hbp(tx) -> bool:
    """Does Dynamo trace this frame (an InstructionTranslator or None) for an hbp backend?"""
    return tx is not None and _is_hbp(getattr(tx.output, "compiler_fn", None))


def tracing_for_hbp() -> bool:
    """Is Dynamo tracing a frame for an hbp backend (with RNN modules on) right now?"""
    return _for_hbp(_current_frame())


class AllowRNNForHBP(int):
    """A value for torch._dynamo.config.allow_rnn that is true only while Dynamo traces a frame
    for an hbp backend: other backends in the process (an exact Inductor compile of the same
    float32 LSTM, which allow_rnn would break) see False, as by default. An int, so that
    Dynamo can hash, pickle and log its config as usual."""

    def __bool__(self) -> bool:
        tx = _current_frame()
        if _for_hbp(tx):
            return True
        if tx is not None:
            _warn_frame_skipped(tx)
        return False

    def __repr__(self) -> str:
        return "AllowRNNForHBP()"


def _warn_frame_skipped(tx) -> None:
    """Another backend meets an RNN module: Dynamo will skip the whole frame, for every backend
    and for the entries compiled before, hbp's included. Say so, once per code object."""
    code = getattr(tx, "f_code", None)
    if code is None or code in _WARNED or not _HBP_IN_USE:
        return
    _WARNED.add(code)
    warnings.warn(
        f"hbp_compile: a backend other than hbp traces an RNN module in {code.co_name} "
        f"({code.co_filename}:{code.co_firstlineno}); Dynamo skips that frame for every backend "
        "from now on, so an hbp compile of the same code runs it eagerly with exact backprop. "
        "Compile it with one backend per process, or set torch._dynamo.config.allow_rnn = True.",
        stacklevel=2)


_WARNED: set = set()
_HBP_IN_USE = False            # an hbp backend exists: other backends skipping frames matters


def _layered_fake_kernels() -> None:
    """While Dynamo traces an hbp frame, compute torch.gru & co.'s fake outputs through the
    layer ops, not torch._decomp's Python RNN (one cell per step: 48 s of Dynamo tracing for a
    1024-step GRU, 0.16 s this way). Other tracers keep torch's kernels unchanged."""
    from torch._C import DispatchKey
    for mode in RNN_FUNCTIONS.values():
        op = getattr(torch.ops.aten, mode).input
        for key in (DispatchKey.CompositeImplicitAutograd, DispatchKey.Autograd,
                    DispatchKey.Meta):
            torch_kernel = op.py_kernels.get(key)
            if torch_kernel is not None and not getattr(torch_kernel, "hbp_layered", False):
                op.py_kernels[key] = _layered_kernel(mode, torch_kernel)
        op._dispatch_cache.clear()


def _layered_kernel(mode: str, torch_kernel):
    """torch's Python kernel of aten.<mode>.input, or the layer ops inside an hbp frame."""
    def kernel(*args, **kwargs):
        if not tracing_for_hbp():
            return torch_kernel(*args, **kwargs)
        return rnn_module("fake", mode, *args, **kwargs)
    kernel.hbp_layered = True
    return kernel


def enable_rnn_tracing(in_use: bool = True) -> bool:
    """Make Dynamo trace RNN modules for hbp backends; False if the user already set it.
    Installed at import (backend="hbp" is looked up, so imported, before Dynamo traces)."""
    global _HBP_IN_USE
    _HBP_IN_USE = _HBP_IN_USE or in_use
    from torch._dynamo import config
    if config.allow_rnn is True or isinstance(config.allow_rnn, AllowRNNForHBP):
        return isinstance(config.allow_rnn, AllowRNNForHBP)
    config.allow_rnn = AllowRNNForHBP(0)
    try:
        _layered_fake_kernels()
    except Exception:                     # noqa: BLE001 - an optimisation of tracing only
        pass
    return True


# ---------------------------------------------------------------------------------------
# Lowering a module call to layers.

def rnn_call_problem(node: fx.Node) -> str:
    """Why this RNN call stays as it is (unrolled by AOTAutograd), or "" to lower it."""
    if isinstance(node.args[3], bool):
        return ""
    return "PackedSequence input (the data/batch_sizes overload)"


def rnn_module(call: str, mode: str, input, hx, params, has_biases: bool, num_layers: int,
               dropout: float, train: bool, bidirectional: bool, batch_first: bool):
    """torch.<mode>(input, hx, params, ...) as layers of hbp::rnn_layer (same results);
    `call` names the module call in the layers' annotations (for the report)."""
    dirs = 2 if bidirectional else 1
    per = len(params) // (num_layers * dirs)
    hs = list(hx) if mode == "lstm" else [hx]          # each (num_layers * dirs, B, H)
    x = input.transpose(0, 1) if batch_first else input              # (T, B, I)
    finals = [[] for _ in hs]
    for layer in range(num_layers):
        outs = []
        for d in range(dirs):
            i = layer * dirs + d
            with annotate(hbp_rnn=f"{mode} layer {layer}" + (" reverse" if d else ""),
                          hbp_rnn_call=call):
                xi = x.flip(0) if d else x
                res = torch.ops.hbp.rnn_layer(mode, xi, [h[i] for h in hs],
                                              list(params[i * per:(i + 1) * per]),
                                              has_biases, train)
            outs.append(res[0].flip(0) if d else res[0])
            for f, t in zip(finals, res[1:]):
                f.append(t)
        x = outs[0] if dirs == 1 else torch.cat(outs, -1)
        if dropout and train and layer < num_layers - 1:
            x = _aten_dropout(x, dropout)
    out = x.transpose(0, 1) if batch_first else x
    finals = [torch.stack(f) for f in finals]
    return (out, *finals)


def _aten_dropout(x, p: float):
    """The dropout ATen's RNN runs between layers (at::dropout), written so that every compile
    keeps it: on a CPU a bernoulli_ on empty_like(x) and x * (noise / (1 - p)) (Inductor falls
    back to ATen's bernoulli there, so the masks are eager's); on a GPU native_dropout, the
    fused kernel at::dropout picks. F.dropout would trace to native_dropout everywhere, whose
    Inductor lowering draws its own numbers: an exact run of the module is eager's."""
    if x.device.type != "cpu":
        return torch.ops.aten.native_dropout(x, p, True)[0]
    noise = torch.empty_like(x).bernoulli_(1 - p)
    return x * noise.div_(1 - p)


def lower_rnn_modules(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """Lower every torch.gru/lstm/rnn_* call of a Dynamo graph; returns (node, reason) skips."""
    skipped, lowered = [], False
    for node in list(gm.graph.nodes):
        mode = RNN_FUNCTIONS.get(node.target) if node.op == "call_function" else None
        if mode is None:
            continue
        why = rnn_call_problem(node)
        if why:
            skipped.append((node.name, why))
            continue
        node.target = rnn_module
        node.args = (node.name, mode, *node.args)
        lowered = True
    if lowered:
        gm.recompile()
    return skipped
