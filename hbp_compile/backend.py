"""The torch.compile backend: capture -> analyse -> rewrite -> codegen -> report.

Anything the pass does not understand runs as exact backprop and the report says why;
with strict=True it raises HBPError instead.
"""
from __future__ import annotations

import collections
import contextlib
import time

import torch
import torch.fx as fx

from .capture_rnn import enable_rnn_tracing, lower_rnn_modules
from .codegen import compile_graph, count_block_vjps
from .config import HBPConfig, HBPError
from .debug import dump_report, readable
from .distributed import context as distributed_context
from .logs import enabled as log_enabled
from .logs import log
from .pipeline import PassContext, run_passes
from .report import GraphReport, SkipReport, totals
from .rewrite.highway_stream import StreamFailure

__all__ = ["HBPBackend", "HBPError"]


_STAGED: list = []          # counts of compile attempts in progress (innermost last)


def _count(name: str, n: int = 1) -> None:
    """Bump counters["hbp_compile"][name] (torch._dynamo.utils.counters, like Inductor's), or
    the compile attempt's staged counts while one runs."""
    from torch._dynamo.utils import counters

    if n:
        (_STAGED[-1] if _STAGED else counters["hbp_compile"])[name] += n


@contextlib.contextmanager
def _attempt_counts():
    """Counts of one compile attempt: kept if it compiles, dropped if the graph is compiled
    again without a failed stream or falls back (so a stream is counted once)."""
    staged = collections.Counter()
    _STAGED.append(staged)
    try:
        yield
    finally:
        _STAGED.pop()
    for name, n in staged.items():             # reached only when the attempt succeeded
        _count(name, n)


def _restart_exceptions() -> tuple:
    """Dynamo's restart signals: control flow, to be passed on, not reported as failures."""
    exc = getattr(getattr(torch, "_dynamo", None), "exc", None)
    restart = getattr(exc, "RestartAnalysis", None)
    return (restart,) if restart is not None else ()


_RESTARTS = _restart_exceptions()


class HBPBackend:
    """A torch.compile backend that trains residual streams with Highway-BP."""

    def __init__(self, config: HBPConfig):
        self.config = config
        self.reports: list[GraphReport] = []
        from torch._dynamo.utils import counters
        self._breaks_seen = dict(counters["graph_break"])
        if config.rnn_modules:
            enable_rnn_tracing()

    def __repr__(self):
        return f"hbp_backend({self.config})"

    def summary(self) -> str:
        """One line for the model: graphs compiled, blocks rewritten over all of them."""
        rewritten, residual = totals(self.reports)
        share = f" (coverage {100 * rewritten / residual:.0f}%)" if residual else ""
        return (f"hbp_compile: {len(self.reports)} graph(s), {rewritten}/{residual} residual "
                f"blocks rewritten{share}")

    def __call__(self, gm: fx.GraphModule, example_inputs):
        cfg = self.config
        report = GraphReport(len(self.reports), config={
            "iters": cfg.iters, "gamma": cfg.gamma, "codegen": cfg.codegen,
            "batched": cfg.batched, "recompute": cfg.recompute, "cache_key": cfg.cache_key()})
        self.reports.append(report)
        report.graph_breaks = self._new_graph_breaks()
        report.distributed = distributed_context()
        report.timings["dynamo_trace_s"] = _dynamo_trace_seconds()
        t0 = time.perf_counter()
        try:
            compiled = self._compile(gm, example_inputs, report)
        except _RESTARTS:
            self.reports.remove(report)       # Dynamo restarts the frame: a new report follows
            raise
        report.timings["backend_s"] = time.perf_counter() - t0
        log.info("%s", report)
        self._dump(report)
        return compiled

    def _new_graph_breaks(self) -> list[str]:
        """Dynamo's graph-break reasons since the previous graph: the breaks that end this one
        (a stream cut by a break is two streams, or none)."""
        from torch._dynamo.utils import counters
        now = counters["graph_break"]
        new = [r for r, n in now.items() if n > self._breaks_seen.get(r, 0)]
        self._breaks_seen = dict(now)
        return new

    def _compile(self, gm: fx.GraphModule, example_inputs, report: GraphReport):
        """Rewrite and compile; on any failure, compile `gm` as it is (exact backprop)."""
        def on_graph(name, g, seconds=None):
            self._on_graph(report, name, g, seconds)

        codegen, key = self.config.codegen, self.config.cache_key()
        patches = self.config.inductor_patches()
        # exact either way: the fallback below compiles the lowered graph too (no unrolling)
        for node, why in lower_rnn_modules(gm):
            report.skipped.append(SkipReport(node, why))
        lowered = list(report.skipped)
        excluded: dict = {}             # stream key -> why it runs exact after all
        while True:
            report.streams.clear()
            report.skipped[:] = lowered + [SkipReport(k, why) for k, why in excluded.items()]
            keys: dict = {}             # stream name -> key (its first step's node)
            stage = "the pass"
            try:
                with _attempt_counts():
                    t0 = time.perf_counter()
                    rewritten = self._rewrite(gm, example_inputs, report, excluded, keys)
                    report.timings["pass_s"] = time.perf_counter() - t0
                    if rewritten is None:
                        break
                    stage = "compiling the rewritten graph"
                    return compile_graph(rewritten, example_inputs, codegen, on_graph, key,
                                         patches)
            except (HBPError, *_RESTARTS):
                raise
            except StreamFailure as e:                # one stream's backward: leave it exact
                if self.config.strict or keys.get(e.stream) in (None, *excluded):
                    self._fall_back(report, f"{stage} failed: {e}", e)
                    break
                excluded[keys[e.stream]] = f"building its Highway-BP backward failed " \
                    f"({e}); this stream runs exact backprop, the others stay rewritten"
                _count("streams_isolated")
                log.warning("hbp_compile graph %d: stream %s", report.index, excluded[keys[e.stream]])
            except Exception as e:                      # noqa: BLE001 - reported, never swallowed
                self._fall_back(report, f"{stage} failed: {type(e).__name__}: {e}", e)
                break
        return compile_graph(gm, example_inputs, codegen, on_graph, key, patches)

    def _dump(self, report: GraphReport) -> None:
        if self.config.dump_dir is not None:
            dump_report(self.config.dump_dir, report)

    def _fall_back(self, report: GraphReport, reason: str, exc: Exception) -> None:
        if self.config.strict:
            raise HBPError(reason) from exc
        report.fallback_reason = reason
        _count("fallbacks")
        for name in ("joint", "forward", "backward"):
            report.graphs.pop(name, None)
        log.warning("hbp_compile graph %d: %s; exact backprop", report.index, reason)

    def _on_graph(self, report: GraphReport, name: str, g, seconds: float = None) -> None:
        if seconds is not None:                        # an Inductor compile just finished
            report.timings[f"{name}_compile_s"] = seconds
            return
        report.graphs[name] = g
        if log_enabled("graphs") and name in ("forward", "backward"):
            log.info("graph %d %s:\n%s", report.index, name, readable(g))
        if name == "backward":         # compiled lazily, at the first backward call
            counts = count_block_vjps(g)
            for s in report.streams:
                s.vjps_per_round = counts.get(s.name, {})
                _count("block_vjps", sum(s.vjps_per_round.values()))
            self._dump(report)

    def _rewrite(self, gm: fx.GraphModule, example_inputs, report: GraphReport,
                 excluded: dict, keys: dict):
        """The rewritten functional aten graph, or None when there is nothing to rewrite.

        Streams whose key (their first step's node) is in `excluded` stay exact; `keys` gets
        each rewritten stream's name -> key."""
        ctx = PassContext(self.config, example_inputs, report, excluded, keys, count=_count)
        return run_passes(gm, ctx)


def _dynamo_trace_seconds() -> float:
    """How long Dynamo traced the frame being compiled (its bytecode_tracing metric)."""
    from torch._dynamo.utils import compilation_time_metrics
    times = compilation_time_metrics.get("bytecode_tracing") or [float("nan")]
    return times[-1]
