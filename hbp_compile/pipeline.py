"""The pass pipeline: Dynamo's graph -> a functional aten graph whose streams call Highway-BP.

    capture              Dynamo's graph -> a functional aten graph (+ batch norms decomposed)
    split_post_norms     post-LN norms -> statistics + affine, so the add before them is a step
    push_views           P(x) + z -> P(x + P^-1 z): residual adds through reshapes and casts
    plan                 find the streams, cut them into segments of blocks, group the blocks
    build_specs          per group: forward / backward split, batching; per stream: its spec
    replace_streams      each stream's nodes -> one HighwayStream call
    replace_rnn_layers   each RNN module layer -> one HighwayRNN call
    finalize             undo the temporary rewrites, sort, dead code, lint, recompile once

Each pass is `(gm, ctx) -> gm` and may set ctx.stop (nothing to rewrite: the backend compiles
the graph as it came). Temporary rewrites (the batch-norm decomposition, the post-norm split)
push their inverse on ctx.undo; finalize applies them, last first. `run_passes` times each
pass into the report, logs it (HBP_LOG=passes), keeps its graph when dumping, and writes it
to torch's structured trace (`tlparse` shows it as hbp_after_<pass>).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional

import torch
import torch.fx as fx

from .analysis.batching import batching_decision
from .analysis.plan import Segment, plan_streams
from .analysis.post_norm import restore_post_norms, split_post_norms as _split_post_norms
from .analysis.views import push_views_off_streams
from .capture import functional_aten_graph, joint_graph, restore_native_batch_norm
from .config import HBPConfig, HBPError
from .debug import readable
from .distributed import CUT_REASON, cut_steps, is_ddp_piece
from .logs import enabled as log_enabled
from .logs import log
from .report import GraphReport, SkipReport, rnn_stream_report, size_hint, stream_report
from .rewrite.highway_rnn import RNNSpec, cell_chunks
from .rewrite.partition import partition_group
from .rewrite.replace import (build_spec, device_type, replace_rnn_layer, replace_stream,
                              rnn_layer_problem)
from .rewrite.scan import choose_scan


@dataclasses.dataclass
class PassContext:
    """What the passes share: the inputs, the report they fill, and what they found."""

    config: HBPConfig
    example_inputs: list
    report: GraphReport
    excluded: dict                  # stream key -> why it stays exact (an earlier attempt)
    keys: dict                      # stream name -> key (its first step's node), filled here
    count: Callable = lambda name, n=1: None        # the backend's counters
    undo: list = dataclasses.field(default_factory=list)      # (counter, inverse), last first
    segments: list = dataclasses.field(default_factory=list)  # plan: Segment per stream
    specs: list = dataclasses.field(default_factory=list)     # (segment, spec, caps, batching)
    stop: bool = False              # nothing to rewrite


def capture(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Dynamo's graph -> a functional aten graph, batch norms in their functional form."""
    agm = functional_aten_graph(gm, ctx.example_inputs)
    if ctx.config.dump_dir is not None or log_enabled("graphs"):
        # as text: the later passes change agm in place (rendering costs ~0.1 s per 1000 ops)
        ctx.report.graphs["captured"] = agm.print_readable(print_output=False)
        ctx.report.graphs["joint_original"] = _try(joint_graph, agm, ctx.example_inputs)
    ctx.undo.append(("batch_norms_restored", restore_native_batch_norm))
    return agm


def _try(fn, *args):
    """fn(*args), or the error as text: a dump must never break a compile."""
    try:
        return fn(*args)
    except Exception as e:                          # noqa: BLE001
        return f"# could not trace: {type(e).__name__}: {e}"


def split_post_norms(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Post-LN: LayerNorm(x + z) -> statistics and affine, so that x + z is a residual step."""
    split = _split_post_norms(gm.graph)
    ctx.count("post_norms_split", len(split))
    ctx.undo.append(("post_norms_restored", lambda graph: restore_post_norms(graph, split)))
    return gm


def push_views(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """P(x) + z -> P(x + P^-1 z) where x is a step's output: the add stays on the stream."""
    ctx.count("views_pushed", push_views_off_streams(gm.graph))
    return gm


def plan(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Find the streams and plan their segments, blocks and groups; report what is skipped."""
    cfg, report = ctx.config, ctx.report
    segments, skips, report.residual_steps = plan_streams(
        gm.graph, cfg.min_length, cfg.exclude, cfg.recompute, (cfg.exact_first, cfg.exact_last))
    report.skipped += [SkipReport(s.node, s.reason) for s in skips]
    for add in cut_steps(gm.graph) if is_ddp_piece(report.distributed) else ():
        report.residual_steps += 1                  # a model block, left exact by the cut
        report.skipped.append(SkipReport(add.name, CUT_REASON))
    problems = [s for s in skips if not s.wanted]
    if cfg.strict and problems:
        raise HBPError(f"%{problems[0].node}: {problems[0].reason}")
    ctx.segments = [s for s in segments if s.blocks[0].step.node.name not in ctx.excluded]
    ctx.count("segments_planned", len(ctx.segments))
    ctx.stop = not segments and not rnn_layers(gm.graph)
    return gm


def build_specs(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Per group: its forward / backward split (or recompute) and batching; per stream: a spec."""
    cfg = ctx.config
    for seg in ctx.segments:
        name = f"hbp_stream_{ctx.report.index}_{len(ctx.specs)}"
        ctx.keys[name] = seg.blocks[0].step.node.name
        for g in seg.groups:
            if cfg.recompute:
                g.recompute_reason = "recompute=True"
            else:
                g.partition = partition_group(
                    g, seg.blocks[g.members[0]].side_differentiable, cfg.fold)
        batched, reasons = zip(*[batching_decision(g, cfg.batched, cfg.strict)
                                 for g in seg.groups])
        spec, caps = build_spec(name, seg.blocks, seg.groups, list(batched),
                                cfg.iters, cfg.gamma, cfg.scan)
        ctx.specs.append((seg, spec, caps, batched, reasons))
    return gm


def replace_streams(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Swap each stream's nodes for one HighwayStream call (its report and counters)."""
    renamed: dict = {}
    for seg, spec, caps, batched, reasons in ctx.specs:
        replace_stream(gm.graph, spec, seg.blocks, caps, renamed)
        ctx.report.streams.append(stream_report(seg, spec, batched, reasons))
        _count_stream(ctx.count, seg, spec, batched)
    return gm


def _count_stream(count, seg: Segment, spec, batched) -> None:
    count("streams_rewritten")
    count("blocks_rewritten", len(seg.blocks))
    count("groups_batched", sum(batched))
    count("capture_fns_batched", sum(g.capture is not None for g in spec.groups))
    count("groups_unbatched", len(batched) - sum(batched))
    count("groups_saved", sum(g.partition is not None for g in seg.groups))
    count("groups_recomputed", sum(g.partition is None for g in seg.groups))
    count("norms_folded", sum(g.partition.folded for g in seg.groups if g.partition is not None))


def rnn_layers(graph: fx.Graph) -> list[fx.Node]:
    """The hbp::rnn_layer nodes of a captured graph (one per RNN layer and direction)."""
    return list(graph.find_nodes(op="call_function", target=torch.ops.hbp.rnn_layer.default))


def replace_rnn_layers(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Each RNN layer and direction left in the graph -> a HighwayRNN stream over time."""
    cfg, report = ctx.config, ctx.report
    layers = rnn_layers(gm.graph)
    report.rnn_calls = len({n.meta.get("custom", {}).get("hbp_rnn_call") for n in layers})
    for node in layers:
        mode, x, hx, params, has_biases, train = node.args
        T = x.meta["val"].shape[0]            # an int, or a SymInt (dynamic shapes)
        report.residual_steps += size_hint(T)
        why = rnn_layer_problem(node) if cfg.rnn_modules else "rnn_modules=False"
        if node.name in ctx.excluded:
            continue                              # reported by the backend
        if why:
            if cfg.strict:
                raise HBPError(f"%{node.name}: {why}")
            report.skipped.append(SkipReport(node.name, why))
            continue
        name = f"hbp_rnn_{report.index}_{len(report.streams)}"
        ctx.keys[name] = node.name
        spec = RNNSpec(name, mode, has_biases, train, cfg.iters, cfg.gamma,
                       choose_scan(T + 1, device_type(x), cfg.scan),
                       cell_chunks(cfg.rnn_time_chunks, T, cfg.iters, device_type(x)))
        report.streams.append(rnn_stream_report(spec, node, len(params)))
        replace_rnn_layer(gm.graph, node, spec)
        ctx.count("streams_rewritten")
        ctx.count("rnn_layers_rewritten")
        ctx.count("blocks_rewritten", size_hint(T))
    ctx.stop = not report.streams
    return gm


def finalize(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Sort (readers of x_l may precede the new call), drop dead code, undo the temporary
    rewrites where no stream took them, lint and recompile once."""
    _stable_topological_sort(gm.graph)
    gm.graph.eliminate_dead_code()
    for name, inverse in reversed(ctx.undo):
        ctx.count(name, inverse(gm.graph))
    gm.graph.lint()
    gm.recompile()
    ctx.report.graphs["rewritten"] = gm         # rendered when read (debug.readable)
    if log_enabled("graphs"):
        log.info("graph %d rewritten:\n%s", ctx.report.index, readable(gm))
    return gm


def _stable_topological_sort(graph: fx.Graph) -> None:
    """Move each node after its inputs, keeping the original order otherwise: a node whose
    inputs are not all placed waits for the last missing one, and follows it."""
    placed, waiting = set(), {}
    pending = list(reversed(graph.nodes))
    cursor = None
    while pending:
        node = pending.pop()
        missing = [i for i in node.all_input_nodes if i not in placed]
        if missing:
            waiting.setdefault(missing[-1], []).append(node)
            continue
        placed.add(node)
        if cursor is not None and cursor.next is not node:
            cursor.append(node)
        cursor = node
        pending.extend(reversed(waiting.pop(node, ())))
    assert not waiting, "a cycle in the rewritten graph"


PASSES = (capture, split_post_norms, push_views, plan, build_specs, replace_streams,
          replace_rnn_layers, finalize)


def run_passes(gm: fx.GraphModule, ctx: PassContext, passes=PASSES) -> Optional[fx.GraphModule]:
    """Run the passes in order: the rewritten graph, or None when there is nothing to rewrite."""
    keep = ctx.config.dump_dir is not None or log_enabled("passes")
    for p in passes:
        t0 = time.perf_counter()
        gm = p(gm, ctx)
        seconds = time.perf_counter() - t0
        ctx.report.timings[f"pass.{p.__name__}_s"] = seconds
        _trace(p.__name__, gm)
        if keep:
            ctx.report.graphs[f"after_{p.__name__}"] = gm.print_readable(print_output=False)
        if log_enabled("passes"):
            log.info("graph %d: pass %s, %.3f s%s", ctx.report.index, p.__name__, seconds,
                     " (nothing to rewrite)" if ctx.stop else "")
        if ctx.stop:
            return None
    return gm


def _trace(name: str, gm: fx.GraphModule) -> None:
    """The graph after a pass, in torch's structured trace (read by tlparse; free when off)."""
    try:
        from torch._logging import trace_structured
    except ImportError:                              # pragma: no cover
        return
    trace_structured("artifact",
                     metadata_fn=lambda: {"name": f"hbp_after_{name}", "encoding": "string"},
                     payload_fn=lambda: gm.print_readable(print_output=False))
