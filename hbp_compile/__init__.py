"""hbp_compile: train residual networks with Highway backpropagation through torch.compile.

    backend = hbp_backend(iters=3)
    model = torch.compile(model, backend=backend)
    loss_fn(model(x)).backward()          # parameter .grad holds Highway-BP gradients
    print(backend.reports[-1])            # what the pass found and did
"""
from __future__ import annotations

from .backend import HBPBackend, HBPError
from .capture_rnn import enable_rnn_tracing
from .config import HBPConfig
from .explain import Explanation, explain
from .fidelity import FidelityResult, calibrate_iters, fidelity
from .report import GraphReport

__all__ = ["hbp_backend", "HBPBackend", "HBPConfig", "HBPError", "GraphReport", "explain",
           "Explanation", "fidelity", "FidelityResult", "calibrate_iters"]


def hbp_backend(iters: int = 3, *, gamma: float = 0.0, codegen: str = "inductor",
                strict: bool = False, dump_dir=None, **options) -> HBPBackend:
    """A torch.compile backend that replaces the backward of residual streams by Highway-BP."""
    return HBPBackend(HBPConfig.from_options(dict(iters=iters, gamma=gamma, codegen=codegen,
                                                  strict=strict, dump_dir=dump_dir, **options)))


_string_backends: dict[HBPConfig, HBPBackend] = {}
enable_rnn_tracing(in_use=False)        # backend="hbp" creates its HBPBackend after tracing


def dynamo_backend(gm, example_inputs, options: dict | None = None, mode=None):
    """The `backend="hbp"` entry point: torch.compile(m, backend="hbp", options={"iters": 2})."""
    options = dict(options or {})
    if mode is not None:
        options.setdefault("mode", mode)
    try:
        config = HBPConfig.from_options(options)
    except ValueError as e:             # as itself, not as Dynamo's BackendCompilerFailed
        raise _option_error(str(e)) from None
    backend = _string_backends.setdefault(config, HBPBackend(config))
    return backend(gm, example_inputs)


def _option_error(message: str) -> ValueError:
    """A ValueError that Dynamo passes on to the caller unwrapped (a ShortenTraceback)."""
    from torch._dynamo.exc import ShortenTraceback

    class HBPOptionError(ShortenTraceback, ValueError):
        def __init__(self, message):
            super().__init__(message, first_useful_frame=None)

    return HBPOptionError(message)


def string_backend(**options) -> HBPBackend:
    """The backend instance that `backend="hbp"` uses for these options (to read its reports)."""
    config = HBPConfig.from_options(options)
    return _string_backends.setdefault(config, HBPBackend(config))

from .schedule import ScheduledIters, calibrated, stepwise  # noqa: E402

__all__ += ["ScheduledIters", "calibrated", "stepwise"]
