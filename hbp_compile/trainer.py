"""Highway-BP under trainers that inspect the model: HuggingFace `Trainer`.

    from hbp_compile.trainer import HBPCallback, compile_for_trainer
    backend = compile_for_trainer(model, iters=2)          # in place: same object, same forward
    trainer = Trainer(model=model, args=TrainingArguments(...), train_dataset=ds,
                      callbacks=[HBPCallback(backend)])
    trainer.train()                                          # HBPCallback logs the report

Why not the usual ways: `TrainingArguments(torch_compile=True, torch_compile_backend="hbp")`
fails (accelerate accepts only its own list of backend names), and a model wrapped by
`torch.compile(model, backend=...)` shows Trainer the wrapper's `forward(*args, **kwargs)`, so
Trainer drops every dataset column unless `remove_unused_columns=False`. `nn.Module.compile`
compiles the module's calls in place: Trainer sees the model's own class, forward signature and
state_dict keys (no `_orig_mod.` prefix in checkpoints).
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("hbp_compile")


def compile_for_trainer(model: torch.nn.Module, iters: int = 2, **options):
    """Compile `model` in place with hbp_backend(iters, **options); returns the backend."""
    from . import hbp_backend

    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise TypeError("compile_for_trainer: pass the uncompiled model (it is compiled in "
                        "place); torch.compile's wrapper hides the forward signature from Trainer")
    if getattr(model, "_compiled_call_impl", None) is not None:
        raise ValueError("compile_for_trainer: the model is already compiled in place "
                         "(model.compile was called); compile it once")
    backend = hbp_backend(iters, **options)
    model.compile(backend=backend)
    return backend


def _callback_base():
    try:
        from transformers import TrainerCallback
    except ImportError as e:
        raise ImportError("HBPCallback needs transformers (pip install -e '.[hf]')") from e
    return TrainerCallback


class HBPCallback(_callback_base()):
    """Checks that Trainer trains through the hbp backend and logs its report after step 1."""

    def __init__(self, backend, require_streams: bool = True):
        self.backend = backend
        self.require_streams = require_streams

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        """Refuse a second compile by Trainer: it would wrap the model in another backend."""
        if getattr(args, "torch_compile", False):
            raise ValueError("HBPCallback: set TrainingArguments(torch_compile=False); the model "
                             "is compiled with Highway-BP by compile_for_trainer (accelerate "
                             "accepts only its own backend names)")
        if model is not None and getattr(model, "_compiled_call_impl", None) is None:
            raise ValueError("HBPCallback: the model is not compiled; call "
                             "compile_for_trainer(model, iters=k) before Trainer(...)")

    def on_step_end(self, args, state, control, **kwargs):
        """After the first step: the backend must have compiled a graph (and found streams)."""
        if state.global_step != 1:
            return
        reports = self.backend.reports
        if not reports:
            raise RuntimeError("HBPCallback: the first training step did not go through the "
                               "hbp backend (Dynamo skipped the model or another compile "
                               "wraps it)")
        streams = [s for r in reports for s in r.streams]
        if self.require_streams and not streams:
            raise RuntimeError("HBPCallback: hbp compiled the model but found no residual "
                               "stream: training runs exact backprop. Reports:\n"
                               + "\n".join(str(r) for r in reports))
        log.info("Highway-BP under Trainer: %d graph(s), streams of lengths %s",
                 len(reports), [s.length for s in streams])
