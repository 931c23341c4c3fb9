"""How good is the Highway-BP gradient? Per k: cosine and relative error against exact backprop,
per layer and overall, and the share of the gradient norm each round adds (the paper's Fig. 6).

    result = fidelity(model, (x,), loss_fn, iters=[0, 1, 2, 4, 8])
    print(result)                       # a table
    result.plot("fidelity.png")         # needs matplotlib (the `plot` extra)
    k = calibrate_iters(model, (x,), loss_fn, target_cosine=0.99)
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Optional, Sequence

import torch

from .explain import clone_args, loss_of


@dataclasses.dataclass
class Agreement:
    """Cosine similarity and relative error ||g - g_exact|| / ||g_exact||."""

    cosine: float
    rel_error: float


@dataclasses.dataclass
class FidelityRow:
    iters: int
    overall: Agreement
    layers: dict[str, Agreement]
    round_share: Optional[float]     # ||g(k) - g(previous k)|| / ||g_exact||; None for the first
    stream_lengths: list[int]


@dataclasses.dataclass
class FidelityResult:
    rows: list[FidelityRow]
    layers: list[str]

    def row(self, iters: int) -> FidelityRow:
        return next(r for r in self.rows if r.iters == iters)

    def __str__(self) -> str:
        head = f"{'layer':<40}" + "".join(f"{'k=' + str(r.iters):>10}" for r in self.rows)
        lines = ["gradient cosine vs exact backprop", head]
        for layer in self.layers:
            lines.append(f"{layer:<40}" + "".join(
                f"{r.layers[layer].cosine:>10.4f}" if layer in r.layers else f"{'-':>10}"
                for r in self.rows))
        lines.append(f"{'overall cosine':<40}" + "".join(f"{r.overall.cosine:>10.4f}"
                                                        for r in self.rows))
        lines.append(f"{'overall relative error':<40}" + "".join(
            f"{r.overall.rel_error:>10.2e}" for r in self.rows))
        lines.append(f"{'norm share added since previous k':<40}" + "".join(
            f"{'-':>10}" if r.round_share is None else f"{r.round_share:>10.2e}"
            for r in self.rows))
        lengths = sorted({L for r in self.rows for L in r.stream_lengths})
        lines.append(f"(stream lengths L: {lengths}; k >= L is exact)")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def plot(self, path: str) -> str:
        """Cosine per layer and overall against k, and the per-round norm share; saves `path`."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ks = [r.iters for r in self.rows]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for layer in self.layers:
            ax1.plot(ks, [r.layers[layer].cosine for r in self.rows], color="0.75", lw=0.8)
        ax1.plot(ks, [r.overall.cosine for r in self.rows], "o-", color="C0", label="overall")
        ax1.set(xlabel="iters k", ylabel="cosine vs exact", title="gradient fidelity")
        ax1.legend()
        shares = [(r.iters, r.round_share) for r in self.rows if r.round_share is not None]
        if shares:
            ax2.semilogy([k for k, _ in shares], [max(s, 1e-17) for _, s in shares], "o-")
        ax2.set(xlabel="iters k", ylabel="||g(k) - g(prev)|| / ||g_exact||",
                title="norm added per round")
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return path


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().double().flatten() for n, p in model.named_parameters()
            if p.grad is not None}


def _agreement(got: torch.Tensor, want: torch.Tensor) -> Agreement:
    denom = want.norm().item()
    cos = torch.nn.functional.cosine_similarity(got, want, dim=0, eps=1e-30).item()
    return Agreement(cos if denom > 0 else float(got.norm().item() == 0),
                     (got - want).norm().item() / denom if denom > 0 else float("nan"))


def _layer_of(name: str) -> str:
    """Parameter name -> its module ("blocks.0.fc1.weight" -> "blocks.0.fc1")."""
    return name.rsplit(".", 1)[0] if "." in name else name


def _run(model, args, kwargs, loss_fn, backend=None) -> dict[str, torch.Tensor]:
    """Gradients of one step on a copy of `model`: exact eager, or compiled with `backend`."""
    m = copy.deepcopy(model)
    a, kw = clone_args(args, kwargs)
    if backend is None:
        loss_of(m(*a, **kw), loss_fn).backward()
        return _grads(m)
    # Each k compiles the same forward code again; past Dynamo's recompile limit it would run
    # eagerly, silently exact, and the table would lie. Lift the limit and check it compiled.
    with torch._dynamo.config.patch(**{_RECOMPILE_LIMIT: 1 << 16}):
        loss_of(torch.compile(m, backend=backend)(*a, **kw), loss_fn).backward()
    if not backend.reports:
        raise RuntimeError("hbp_compile.fidelity: Dynamo did not compile the model")
    return _grads(m)


_RECOMPILE_LIMIT = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") \
    else "cache_size_limit"


def fidelity(model: torch.nn.Module, inputs: Sequence, loss_fn: Optional[Callable] = None,
             iters: Sequence[int] = (0, 1, 2, 4, 8), codegen: str = "eager",
             kwargs: Optional[dict] = None, **options) -> FidelityResult:
    """Highway-BP gradients at each k against exact backprop, on copies of `model`."""
    from . import hbp_backend

    kwargs = kwargs or {}
    exact = _run(model, tuple(inputs), kwargs, loss_fn)
    names = list(exact)
    layers = list(dict.fromkeys(_layer_of(n) for n in names))
    exact_all = torch.cat([exact[n] for n in names])
    rows, previous = [], None
    for k in sorted(set(iters)):
        backend = hbp_backend(iters=k, codegen=codegen, **options)
        got = _run(model, tuple(inputs), kwargs, loss_fn, backend)
        got_all = torch.cat([got.get(n, torch.zeros_like(exact[n])) for n in names])
        per_layer = {}
        for layer in layers:
            ns = [n for n in names if _layer_of(n) == layer]
            per_layer[layer] = _agreement(torch.cat([got.get(n, torch.zeros_like(exact[n]))
                                                     for n in ns]),
                                          torch.cat([exact[n] for n in ns]))
        share = None if previous is None else \
            ((got_all - previous).norm() / exact_all.norm()).item()
        lengths = [s.length for r in backend.reports for s in r.streams]
        rows.append(FidelityRow(k, _agreement(got_all, exact_all), per_layer, share, lengths))
        previous = got_all
    return FidelityResult(rows, layers)


def check_target_cosine(caller: str, target_cosine: float) -> None:
    """A gradient cosine to reach must be in (0, 1]."""
    if not 0.0 < target_cosine <= 1.0:
        raise ValueError(f"{caller}: target_cosine must be in (0, 1], got {target_cosine}")


def calibrate_iters(model: torch.nn.Module, inputs: Sequence, loss_fn: Optional[Callable] = None,
                    target_cosine: float = 0.99, max_iters: Optional[int] = None,
                    **kw) -> int:
    """The smallest k whose overall gradient cosine vs exact backprop reaches target_cosine.

    Tries k = 0, 1, 2, ... in order (no monotonicity assumed) up to max_iters, by default the
    longest stream found, where Highway-BP is exact (cosine 1).
    """
    check_target_cosine("calibrate_iters", target_cosine)
    k = 0
    while True:
        row = fidelity(model, inputs, loss_fn, iters=[k], **kw).rows[0]
        exact_from = max(row.stream_lengths, default=0)      # k >= L: exact by construction
        if row.overall.cosine >= target_cosine or (max_iters is None and k >= exact_from):
            return k
        if max_iters is not None and k >= max_iters:
            raise ValueError(f"calibrate_iters: cosine {row.overall.cosine:.4f} < "
                             f"{target_cosine} at max_iters={max_iters}")
        k += 1
