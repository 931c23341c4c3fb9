"""Stage 5, report: what the pass found, rewrote, batched and left to exact backprop, per graph."""
from __future__ import annotations

import dataclasses
import json
from typing import Optional


def describe(e: BaseException, limit: int = 160) -> str:
    """An exception as a report reason: its type and the first line of its message."""
    first = str(e).splitlines()[0][:limit] if str(e) else ""
    return f"{type(e).__name__}: {first}"


@dataclasses.dataclass
class BlockReport:
    index: int                      # position l in the stream
    first: str                      # first and last forward node of the block body
    last: str
    module_path: Optional[str]
    group: int
    n_ops: int


@dataclasses.dataclass
class GroupReport:
    index: int
    signature: str
    summary: str
    members: list[int]
    batched: bool
    reason: str = ""                # why not batched
    shared_captures: int = 0        # captures that are one value for all members (tied weights)
    saved: int = -1                 # activations the forward saves per block; -1: recomputes
    recompute_reason: str = ""      # why the backward recomputes the block's forward
    folded_norms: int = 0           # norms whose affine weights the final VJP folds into dW
    capture_ops: int = 0            # ops of the members' capture function (final VJP, batched)

    @property
    def size(self) -> int:
        return len(self.members)


@dataclasses.dataclass
class StreamReport:
    name: str
    length: int                     # L
    residual_kind: str
    x0: str
    blocks: list[BlockReport]
    groups: list[GroupReport]
    injections: list[int]           # positions l < L whose state is read outside the stream
    side_outputs: int
    scan: str
    vjps_per_round: dict = dataclasses.field(default_factory=dict)   # filled from the bw graph
    split: str = ""                 # where the chain goes on through a non-residual step
    source: str = ""                # what the stream is in the model (an RNN module's layer)
    views: dict = dataclasses.field(default_factory=dict)   # block l -> views its add went through


@dataclasses.dataclass
class SkipReport:
    node: str
    reason: str


def totals(reports) -> tuple[int, int]:
    """(rewritten, residual) blocks over every graph of a model: Dynamo's graphs, or
    DDPOptimizer's pieces of one."""
    return sum(r.rewritten_blocks for r in reports), sum(r.residual_steps for r in reports)


@dataclasses.dataclass
class GraphReport:
    index: int
    config: dict
    streams: list[StreamReport] = dataclasses.field(default_factory=list)
    skipped: list[SkipReport] = dataclasses.field(default_factory=list)
    residual_steps: int = 0         # residual steps found in the graph
    rnn_calls: int = 0              # RNN module calls traced (allow_rnn) and lowered to layers
    timings: dict = dataclasses.field(default_factory=dict)   # compile stage -> seconds
    fallback_reason: Optional[str] = None
    graph_breaks: list = dataclasses.field(default_factory=list)  # Dynamo's, before this graph
    distributed: Optional[str] = None   # how DDP / FSDP2 shaped this graph (distributed.context)
    graphs: dict = dataclasses.field(default_factory=dict, repr=False)  # name -> GraphModule

    @property
    def rewritten_blocks(self) -> int:
        return 0 if self.fallback_reason else sum(s.length for s in self.streams)

    @property
    def coverage(self) -> float:
        """Fraction of the graph's residual blocks whose backward was rewritten."""
        return self.rewritten_blocks / self.residual_steps if self.residual_steps else 0.0

    @property
    def rewritten(self) -> bool:
        return bool(self.streams) and self.fallback_reason is None

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("graphs")
        d.update(coverage=self.coverage, rewritten_blocks=self.rewritten_blocks,
                 rewritten=self.rewritten)
        return d

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1, default=str)

    def __str__(self) -> str:
        c = self.config
        head = (f"hbp_compile graph {self.index} (iters={c.get('iters')}, gamma={c.get('gamma')}, "
                f"codegen={c.get('codegen')}): ")
        if self.fallback_reason is not None:
            lines = [head + f"exact backprop (fallback: {self.fallback_reason})"]
        else:
            lines = [head + f"{len(self.streams)} stream(s), {self.rewritten_blocks}/"
                     f"{self.residual_steps} residual blocks rewritten "
                     f"(coverage {100 * self.coverage:.0f}%)"]
        if self.distributed:
            lines.append(f"  distributed: {self.distributed}")
        if self.rnn_calls:
            lines.append(f"  {self.rnn_calls} RNN module call(s) traced (Dynamo's allow_rnn, "
                         "set for hbp frames) and lowered to one op per layer and direction")
        if self.timings:
            lines.append("  compile: " + ", ".join(f"{k.removesuffix('_s')} {v:.2f}s"
                                                   for k, v in self.timings.items()))
        for s in self.streams:
            lines += _stream_lines(s, planned=self.fallback_reason is not None)
        for sk in self.skipped:
            lines.append(f"  not rewritten: %{sk.node}: {sk.reason}")
        for reason in self.graph_breaks:
            lines.append(f"  graph break before this graph (a stream cannot cross it): "
                         f"{reason.splitlines()[0][:200]}")
        hint = graph_break_hint(self.graph_breaks)
        if hint:
            lines.append(f"  hint: {hint}")
        if not self.streams and self.fallback_reason is None:
            lines.append("  no residual stream found: exact backprop")
        return "\n".join(lines)


def _stream_lines(s: "StreamReport", planned: bool) -> list[str]:
    """A stream's lines of the report: the stream, its groups, its blocks, then notes."""
    lines = []
    inj = ", ".join(f"x_{l}" for l in s.injections) if len(s.injections) <= 8 else \
        f"x_l, l in {ranges(s.injections)} ({len(s.injections)} states)"
    inj = inj or "none"
    prefix = "(planned, not applied) " if planned else ""
    lines.append(f"  {prefix}stream {s.name}: L={s.length}, {s.residual_kind} residual, "
                 f"x_0={s.x0}, scan={s.scan}, gradient injected at: {inj}"
                 + (f", {s.side_outputs} side output(s)" if s.side_outputs else "")
                 + (f" [{s.source}]" if s.source else ""))
    for g in s.groups:
        how = "batched" if g.batched else f"unbatched ({g.reason})"
        tied = f", {g.shared_captures} shared capture(s)" if g.shared_captures else ""
        tied += f", {g.saved} saved activation(s) per block" if g.saved >= 0 else \
            f", forward recomputed in the backward ({g.recompute_reason})"
        tied += f", {g.folded_norms} norm affine(s) folded" if g.folded_norms else ""
        tied += f", per-block captures computed by {g.capture_ops} op(s) differentiated " \
            f"batched" if g.capture_ops else ""
        lines.append(f"    group {g.index}: {g.size} block(s) {ranges(g.members)} {how}"
                     f"{tied} -- {g.summary}")
    for b in s.blocks:
        where = b.module_path or "?"
        lines.append(f"    block {b.index:>3} group {b.group}  {where:<28} "
                     f"%{b.first} .. %{b.last} ({b.n_ops} ops)")
    if s.views:
        lines.append(f"    stream continues through views at block(s) "
                     f"{ranges(sorted(s.views))} (the add reads x_l, its block starts "
                     f"with the view: {', '.join(dict.fromkeys(v for vs in s.views.values() for v in vs))})")
    if s.split:
        lines.append(f"    {s.split}")
    if s.vjps_per_round:
        per = ", ".join(f"{r}: {n}" for r, n in s.vjps_per_round.items())
        lines.append(f"    block VJPs in the backward graph per round: {per}")
    return lines


# Dynamo's words for a break at a data-dependent value (MoE routing: tokens per expert,
# nonzero, .item(), .tolist()) and the settings that keep such ops in the graph
_DATA_DEPENDENT = ("data dependent", "data-dependent", "dynamic shape operator", "item()",
                   "tolist", "nonzero", "unbacked")


def graph_break_hint(reasons: list[str]) -> str:
    """What to set when a graph broke at a data-dependent value, else ""."""
    if not any(w in r.lower() for r in reasons for w in _DATA_DEPENDENT):
        return ""
    return ("the graph broke at a data-dependent value (e.g. mixture-of-experts routing, "
            "packing variable-length sequences). A Python loop over the experts a batch hits "
            "cannot be one graph: use a batched "
            "experts implementation (transformers: the default experts_implementation, not "
            "'eager'); a nonzero or .item() alone stays in the graph with "
            "torch._dynamo.config.capture_dynamic_output_shape_ops = True and "
            "capture_scalar_outputs = True")


def ranges(xs: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"; [0, 2, 4] -> "0-4/2"."""
    if len(xs) > 2:
        step = xs[1] - xs[0]
        if step > 0 and all(b - a == step for a, b in zip(xs, xs[1:])):
            return f"[{xs[0]}-{xs[-1]}" + (f"/{step}]" if step > 1 else "]")
    return "[" + ",".join(map(str, xs)) + "]"


# ---------------------------------------------------------------------------------------------
# Building the reports of rewritten streams (called by the pipeline's replace passes).

def stream_report(seg, spec, batched, reasons) -> StreamReport:
    """The report of a rewritten stream: its planned segment and the spec its backward runs."""
    from .analysis.views import VIEWS
    from .rewrite.scan import describe as describe_scan

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
    views = {l: list(b.step.node.meta[VIEWS]) for l, b in enumerate(seg.blocks)
             if VIEWS in b.step.node.meta}
    return StreamReport(name=spec.name, length=len(seg.blocks), residual_kind=seg.kind,
                        x0=seg.x0.name, blocks=blocks, groups=groups,
                        injections=sorted({l for l, _ in spec.state_outputs if l < spec.length}),
                        side_outputs=sum(len(b.side_outputs) for b in seg.blocks),
                        scan=describe_scan(spec), split=seg.split, views=views)


_RNN_RESIDUALS = {"rnn_tanh": "none (h_t = tanh(.), K = 0)",
                  "rnn_relu": "none (h_t = relu(.), K = 0)",
                  "gru": "GRU gate z h + (1 - z) n", "lstm": "LSTM (c, h): c = f c + i g"}


def rnn_stream_report(spec, node, n_params: int) -> StreamReport:
    """The report of an RNN module's layer rewritten as a HighwayRNN stream over time."""
    from .rewrite.scan import describe_rnn

    mode, x, hx = node.args[:3]
    T = x.meta["val"].shape[0]
    steps = size_hint(T)
    H = hx[0].meta["val"].shape[-1]
    where = (node.meta.get("custom") or {}).get("hbp_rnn", mode)
    stack = node.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0] if stack else ""
    out = [u for u in node.users if u.args[1] == 0 and u.users]
    words = f"{steps} steps" if isinstance(T, int) else \
        f"T steps (symbolic; {steps} at compile time)"
    how = "one VJP over T x B rows per round" if spec.chunks == 1 else \
        f"one VJP per round in {spec.chunks} runs of time steps (rnn_time_chunks)"
    group = GroupReport(0, f"{mode} cell", f"{mode} cell, hidden {H}, weights shared by all "
                        f"{words}: {how}", list(range(steps)), True,
                        shared_captures=n_params, saved=-1,
                        recompute_reason="the gates of all T steps, in one batched cell forward "
                        "from the op's outputs (ATen's RNN op saves none)")
    return StreamReport(name=spec.name, length=steps, residual_kind=_RNN_RESIDUALS[mode],
                        x0=hx[0].name, blocks=[], groups=[group],
                        injections=list(range(1, steps)) if out else [], side_outputs=0,
                        scan=describe_rnn(mode, spec.scan),
                        source=f"{path}: {where}".strip(": "))


def size_hint(n) -> int:
    """An int, or a SymInt's value at compile time (its hint), read without adding a guard."""
    if isinstance(n, int):
        return n
    hint = getattr(n.node, "hint", None)
    return int(hint) if hint is not None else 0
