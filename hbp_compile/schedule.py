"""Iters schedules: change k during training without recompiling every step.

    scheduled = ScheduledIters(model, schedule=lambda step: 0 if step < 500 else 2)
    for step in range(1000):
        loss = scheduled(x, y)              # compiled with hbp_backend(iters=k), k = schedule(step)
        loss.backward(); opt.step(); opt.zero_grad()
    print(scheduled.summary())              # which k each step used, compiles per k

Each distinct k gets one `torch.compile` wrapper (with its own HBPBackend) over the SAME module,
so parameters, buffers and the optimizer are shared; a k compiles on its first step and every
later step with that k reuses the compiled code (Dynamo keeps one cache entry per backend).
`calibrated(...)` is a schedule that re-chooses k every N steps, as `calibrate_iters` does
(the smallest k whose gradient cosine vs exact backprop reaches a target).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence, Union

import torch

from .fidelity import _RECOMPILE_LIMIT, check_target_cosine, fidelity

Schedule = Callable[[int], int]


@dataclasses.dataclass
class KUse:
    """A run of consecutive steps [first, last] trained with iters k."""

    k: int
    first: int
    last: int


class ScheduledIters:
    """A module called through hbp_backend(iters=schedule(step)), one compile per distinct k."""

    def __init__(self, model: torch.nn.Module, schedule: Union[Schedule, int],
                 recompile_limit: int = 64, **backend_options):
        if not isinstance(model, torch.nn.Module):
            raise TypeError("ScheduledIters: model must be an nn.Module, got "
                            f"{type(model).__name__}")
        if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            raise TypeError("ScheduledIters: pass the uncompiled module; it compiles one wrapper "
                            "per k itself")
        self.model = model
        self.schedule = (lambda step: schedule) if isinstance(schedule, int) else schedule
        self.recompile_limit = recompile_limit
        self.backend_options = backend_options
        self.backends: dict[int, object] = {}     # k -> HBPBackend (its .reports)
        self.compiled: dict[int, torch.nn.Module] = {}
        self.ks: list[int] = []                   # k of every step, in step order
        self.step = 0

    def wrapper(self, k: int) -> torch.nn.Module:
        """The compiled wrapper for iters k, created on first use."""
        if k not in self.compiled:
            from . import hbp_backend
            self.backends[k] = hbp_backend(iters=k, **self.backend_options)
            self.compiled[k] = torch.compile(self.model, backend=self.backends[k])
        return self.compiled[k]

    def __call__(self, *args, **kwargs):
        """One training step's forward: k = schedule(step), then step += 1."""
        k = self.schedule(self.step)
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ValueError(f"ScheduledIters: the schedule returned {k!r} at step {self.step}; "
                             "iters k must be an int >= 0")
        first_use = k not in self.compiled
        # Every k adds a cache entry for the same forward code; past Dynamo's recompile limit
        # it would run eagerly, silently exact: lift the limit, and check that k compiled.
        with torch._dynamo.config.patch(**{_RECOMPILE_LIMIT: self.recompile_limit}):
            out = self.wrapper(k)(*args, **kwargs)
        if first_use and not self.backends[k].reports:
            raise RuntimeError(f"ScheduledIters: Dynamo did not compile the model with "
                               f"hbp_backend(iters={k}) (recompile limit or a skipped frame)")
        self.ks.append(k)
        self.step += 1
        return out

    def compiles(self) -> dict[int, int]:
        """Graphs compiled per k (one per graph of the model, not one per step)."""
        return {k: len(b.reports) for k, b in self.backends.items()}

    def uses(self) -> list[KUse]:
        """The steps grouped into runs of the same k."""
        runs: list[KUse] = []
        for step, k in enumerate(self.ks):
            if runs and runs[-1].k == k:
                runs[-1].last = step
            else:
                runs.append(KUse(k, step, step))
        return runs

    def summary(self) -> str:
        """Which k each step used and how many graphs each k compiled."""
        runs = ", ".join(f"steps {u.first}-{u.last}: k={u.k}" for u in self.uses())
        compiles = ", ".join(f"k={k}: {n}" for k, n in sorted(self.compiles().items()))
        return (f"iters schedule over {len(self.ks)} steps: {runs or '-'}; "
                f"graphs compiled {compiles}")


def stepwise(milestones: Sequence[tuple[int, int]]) -> Schedule:
    """k from (first_step, k) pairs: [(0, 0), (300, 1), (600, 2)] -> k=0, then 1 from 300, ..."""
    points = sorted(milestones)
    if not points or points[0][0] != 0:
        raise ValueError("stepwise: the milestones must start at step 0, e.g. [(0, 0), (300, 2)]")

    def schedule(step: int) -> int:
        return [k for first, k in points if first <= step][-1]
    return schedule


def calibrated(model: torch.nn.Module, inputs: Callable[[], Sequence],
               loss_fn: Optional[Callable] = None, every: int = 100,
               target_cosine: float = 0.95, candidates: Sequence[int] = (0, 1, 2, 4),
               **fidelity_options) -> Schedule:
    """k re-chosen at steps 0, every, 2*every, ...: the smallest candidate whose gradient cosine
    vs exact backprop on inputs() reaches target_cosine (calibrate_iters over a short list, one
    exact backward per calibration), else the largest candidate."""
    if every < 1:
        raise ValueError(f"calibrated: every must be >= 1, got {every}")
    check_target_cosine("calibrated", target_cosine)
    if not candidates or any(not isinstance(k, int) or k < 0 for k in candidates):
        raise ValueError(f"calibrated: candidates must be ints >= 0, got {candidates!r}")
    state: dict[str, int] = {}
    choices: list[tuple[int, int, float]] = []       # (step, k, cosine) per calibration

    def schedule(step: int) -> int:
        if "k" not in state or step // every != state["at"] // every:
            result = fidelity(model, tuple(inputs()), loss_fn, iters=candidates,
                              **fidelity_options)
            row = next((r for r in result.rows if r.overall.cosine >= target_cosine),
                       result.rows[-1])
            state["k"], state["at"] = row.iters, step
            choices.append((step, row.iters, row.overall.cosine))
        return state["k"]
    schedule.choices = choices          # what each calibration picked, for the report
    return schedule
