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

from .analysis.batching import batching_problem
from .analysis.plan import Segment, plan_streams
from .analysis.post_norm import restore_post_norms, split_post_norms
from .analysis.views import VIEWS, push_views_off_streams
from .capture import functional_aten_graph, joint_graph, restore_native_batch_norm
from .capture_rnn import enable_rnn_tracing, lower_rnn_modules
from .codegen import compile_graph, count_block_vjps
from .config import HBPConfig
from .debug import dump_report, readable
from .logs import enabled as log_enabled
from .logs import log
from .report import BlockReport, GraphReport, GroupReport, SkipReport, StreamReport, ranges
from .rewrite.highway_rnn import RNNSpec
from .rewrite.highway_stream import StreamFailure
from .rewrite.partition import partition_group
from .rewrite.replace import (build_spec, device_type, replace_rnn_layer, replace_stream,
                              rnn_layer_problem)
from .rewrite.scan import choose_scan


_STAGED: list = []          # counts of compile attempts in progress (innermost last)


def _count(name: str, n: int = 1) -> None:
    """Bump counters["hbp_compile"][name] (torch._dynamo.utils.counters, like Inductor's), or
    the compile attempt's staged counts while one runs."""
    from torch._dynamo.utils import counters

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


class HBPError(RuntimeError):
    """Raised in strict mode where the pass would otherwise fall back to exact backprop."""


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

    def __call__(self, gm: fx.GraphModule, example_inputs):
        cfg = self.config
        report = GraphReport(len(self.reports), config={
            "iters": cfg.iters, "gamma": cfg.gamma, "codegen": cfg.codegen,
            "batched": cfg.batched, "recompute": cfg.recompute, "cache_key": cfg.cache_key()})
        self.reports.append(report)
        report.graph_breaks = self._new_graph_breaks()
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
        cfg = self.config
        agm = functional_aten_graph(gm, example_inputs)
        report.graphs["captured"] = agm.print_readable(print_output=False)
        if cfg.dump_dir is not None:
            report.graphs["joint_original"] = _try(joint_graph, agm, example_inputs)
        post_norms = split_post_norms(agm.graph)
        push_views_off_streams(agm.graph)
        segments, skips, report.residual_steps = plan_streams(
            agm.graph, cfg.min_length, cfg.exclude, cfg.recompute,
            (cfg.exact_first, cfg.exact_last))
        report.skipped += [SkipReport(s.node, s.reason) for s in skips]
        problems = [s for s in skips if not s.wanted]
        if cfg.strict and problems:
            raise HBPError(f"%{problems[0].node}: {problems[0].reason}")
        if not segments and not _rnn_layers(agm.graph):
            return None
        renamed: dict = {}
        for seg in segments:
            if seg.blocks[0].step.node.name in excluded:
                continue
            name = f"hbp_stream_{report.index}_{len(report.streams)}"
            keys[name] = seg.blocks[0].step.node.name
            for g in seg.groups:
                if cfg.recompute:
                    g.recompute_reason = "recompute=True"
                else:
                    g.partition = partition_group(
                        g, seg.blocks[g.members[0]].side_differentiable, cfg.fold)
            batched, reasons = zip(*[self._batching(g) for g in seg.groups])
            spec, caps = build_spec(name, seg.blocks, seg.groups, list(batched),
                                    cfg.iters, cfg.gamma, cfg.scan)
            replace_stream(agm.graph, spec, seg.blocks, caps, renamed)
            report.streams.append(_stream_report(name, seg, spec, batched, reasons))
            _count("streams_rewritten")
            _count("blocks_rewritten", len(seg.blocks))
            _count("groups_batched", sum(batched))
            _count("capture_fns_batched", sum(g.capture is not None for g in spec.groups))
            _count("groups_unbatched", len(batched) - sum(batched))
            _count("groups_saved", sum(g.partition is not None for g in seg.groups))
            _count("groups_recomputed", sum(g.partition is None for g in seg.groups))
            _count("norms_folded", sum(g.partition.folded for g in seg.groups
                                       if g.partition is not None))
        restore_native_batch_norm(agm.graph)
        _stable_topological_sort(agm.graph)    # readers of x_l may precede the new call
        agm.graph.eliminate_dead_code()
        self._rewrite_rnn_layers(agm.graph, report, excluded, keys)
        if not report.streams:
            return None
        restore_post_norms(agm.graph, post_norms)
        agm.graph.lint()
        agm.recompile()
        report.graphs["rewritten"] = agm.print_readable(print_output=False)
        if log_enabled("graphs"):
            log.info("graph %d rewritten:\n%s", report.index, report.graphs["rewritten"])
        return agm

    def _rewrite_rnn_layers(self, graph: fx.Graph, report: GraphReport, excluded: dict,
                            keys: dict) -> None:
        """Each RNN layer and direction left in the graph -> a HighwayRNN stream over time."""
        cfg = self.config
        layers = _rnn_layers(graph)
        report.rnn_calls = len({n.meta.get("custom", {}).get("hbp_rnn_call") for n in layers})
        for node in layers:
            mode, x, hx, params, has_biases, train = node.args
            T = x.meta["val"].shape[0]            # an int, or a SymInt (dynamic shapes)
            steps = _size_hint(T)                 # for the report: never a guard on T
            report.residual_steps += steps
            why = rnn_layer_problem(node) if cfg.rnn_modules else "rnn_modules=False"
            if node.name in excluded:
                continue                              # reported by the caller
            if why:
                if cfg.strict:
                    raise HBPError(f"%{node.name}: {why}")
                report.skipped.append(SkipReport(node.name, why))
                continue
            name = f"hbp_rnn_{report.index}_{len(report.streams)}"
            keys[name] = node.name
            spec = RNNSpec(name, mode, has_biases, train, cfg.iters, cfg.gamma,
                           choose_scan(T + 1, device_type(x), cfg.scan))
            report.streams.append(_rnn_stream_report(spec, node, steps, len(params),
                                                     symbolic=not isinstance(T, int)))
            replace_rnn_layer(graph, node, spec)
            _count("streams_rewritten")
            _count("rnn_layers_rewritten")
            _count("blocks_rewritten", steps)

    def _batching(self, group) -> tuple[bool, str]:
        """Batch this group's VJPs? (and why not)."""
        if group.size == 1:
            return False, "a single block"
        if not self.config.batched:
            return False, "batching disabled (batched=False)"
        if self.config.batched == "auto" and (why := _not_worth_batching(group)):
            return False, why
        reason = batching_problem(group)
        if reason is not None and self.config.strict:
            raise HBPError(f"group of {group.size} blocks cannot be batched: {reason}")
        return reason is None, reason or ""


def _rnn_layers(graph: fx.Graph) -> list[fx.Node]:
    """The hbp::rnn_layer nodes of a captured graph (one per RNN layer and direction)."""
    return list(graph.find_nodes(op="call_function", target=torch.ops.hbp.rnn_layer.default))


_RNN_RESIDUALS = {"rnn_tanh": "none (h_t = tanh(.), K = 0)", "rnn_relu": "none (h_t = relu(.), K = 0)",
                  "gru": "GRU gate z h + (1 - z) n", "lstm": "LSTM (c, h): c = f c + i g"}


def _rnn_stream_report(spec: RNNSpec, node: fx.Node, T: int, n_params: int,
                       symbolic: bool = False) -> StreamReport:
    mode, x, hx = node.args[:3]
    H = hx[0].meta["val"].shape[-1]
    where = (node.meta.get("custom") or {}).get("hbp_rnn", mode)
    stack = node.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0] if stack else ""
    out = [u for u in node.users if u.args[1] == 0 and u.users]
    scan = "none (K = 0)" if mode.startswith("rnn") else f"{spec.scan} diagonal scan over time" \
        + (", K = diag(z)" if mode == "gru" else ", K in c: f (h through o tanh'(c) f)")
    steps = f"T steps (symbolic; {T} at compile time)" if symbolic else f"{T} steps"
    group = GroupReport(0, f"{mode} cell", f"{mode} cell, hidden {H}, weights shared by all "
                        f"{steps}: one VJP over T x B rows per round", list(range(T)), True,
                        shared_captures=n_params, saved=-1,
                        recompute_reason="the gates of all T steps, in one batched cell forward "
                        "from the op's outputs (ATen's RNN op saves none)")
    return StreamReport(name=spec.name, length=T, residual_kind=_RNN_RESIDUALS[mode],
                        x0=hx[0].name, blocks=[], groups=[group],
                        injections=list(range(1, T)) if out else [], side_outputs=0,
                        scan=scan, source=f"{path}: {where}".strip(": "))


def _size_hint(n) -> int:
    """An int, or a SymInt's value at compile time (its hint), read without adding a guard."""
    if isinstance(n, int):
        return n
    hint = getattr(n.node, "hint", None)
    return int(hint) if hint is not None else 0


def _dynamo_trace_seconds() -> float:
    """How long Dynamo traced the frame being compiled (its bytecode_tracing metric)."""
    from torch._dynamo.utils import compilation_time_metrics
    times = compilation_time_metrics.get("bytecode_tracing") or [float("nan")]
    return times[-1]


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


def _try(fn, *args):
    """fn(*args), or the error as text: a dump must never break a compile."""
    try:
        return fn(*args)
    except Exception as e:                          # noqa: BLE001
        return f"# could not trace: {type(e).__name__}: {e}"


def _stable_topological_sort(graph: fx.Graph) -> None:
    """Move nodes after their inputs, keeping the original order otherwise."""
    try:
        from torch._inductor.pattern_matcher import stable_topological_sort
    except ImportError:                              # pragma: no cover
        from torch.fx.passes.tools_common import legalize_graph
        legalize_graph(graph.owning_module)
        return
    stable_topological_sort(graph)


def _stream_report(name, seg: Segment, spec, batched, reasons) -> StreamReport:
    blocks = [BlockReport(l, b.body[0].name, b.body[-1].name, b.module_path,
                          spec.block_group[l], len(b.body))
              for l, b in enumerate(seg.blocks)]
    groups = [GroupReport(gi, g.template.signature, g.template.summary, list(g.members),
                          batched[gi], reasons[gi], sum(g.shared),
                          g.partition.n_saved if g.partition is not None else -1,
                          g.recompute_reason,
                          g.partition.folded if g.partition is not None else 0,
                          spec.groups[gi].capture.fn_ops if spec.groups[gi].capture else 0)
              for gi, g in enumerate(seg.groups)]
    if spec.gamma == 1:
        scan = "none (gamma=1: fixed-point iteration)"
    elif spec.projections:
        scan = (f"sequential, one state per position (x_l changes shape at projection step(s) "
                f"{ranges(sorted(spec.projections))}, whose dense K_l^T is the shortcut's VJP)")
    elif spec.width > 1:
        m = spec.width
        scan = f"{spec.scan} scan with {m}x{m} K_l = dr/dx_l per coordinate (x_l has {m} " \
            f"components)" + (f" x (1-gamma)={1 - spec.gamma:g}" if spec.gamma else "")
    elif not spec.identity:
        scan = f"{spec.scan} diagonal scan, K_l = dr/dx_l" + \
            (f" x (1-gamma)={1 - spec.gamma:g}" if spec.gamma else "")
    else:
        scan = {"sequential": f"reverse sum ({spec.length} fused adds)",
                "chunked": "chunked reverse sum", "op": "reverse sum (one op)"}.get(
                    spec.scan, "reverse cumsum") \
            if spec.gamma == 0 else \
            f"{spec.scan} scan, K=(1-gamma)I={1 - spec.gamma:g}I"
    return StreamReport(name=name, length=len(seg.blocks), residual_kind=seg.kind,
                        x0=seg.x0.name, blocks=blocks, groups=groups,
                        injections=sorted({l for l, _ in spec.state_outputs if l < spec.length}),
                        side_outputs=sum(len(b.side_outputs) for b in seg.blocks), scan=scan,
                        split=seg.split, views=_views(seg))


def _views(seg: Segment) -> dict:
    """Block l -> the view ops its residual add was moved through (analysis/views.py)."""
    return {l: list(b.step.node.meta[VIEWS]) for l, b in enumerate(seg.blocks)
            if VIEWS in b.step.node.meta}
