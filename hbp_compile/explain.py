"""explain(): compile and run one step on example inputs, return what the pass did, change nothing.

The model is deep-copied, so its parameters, gradients and buffers (BatchNorm statistics) are
untouched; graph breaks come from Dynamo's own counters for this run.
"""
from __future__ import annotations

import copy
import dataclasses
import json

import torch

from .config import HBPConfig
from .report import GraphReport, totals


@dataclasses.dataclass
class Explanation:
    """The reports of every graph Dynamo compiled for one forward/backward, and its graph breaks."""

    reports: list[GraphReport]
    graph_breaks: list[str]
    config: HBPConfig

    @property
    def residual_blocks(self) -> int:
        return totals(self.reports)[1]

    @property
    def rewritten_blocks(self) -> int:
        return totals(self.reports)[0]

    @property
    def coverage(self) -> float:
        return self.rewritten_blocks / self.residual_blocks if self.residual_blocks else 0.0

    def __str__(self) -> str:
        lines = [f"hbp_compile.explain (iters={self.config.iters}): {len(self.reports)} graph(s), "
                 f"{len(self.graph_breaks)} graph break(s), {self.rewritten_blocks}/"
                 f"{self.residual_blocks} residual blocks rewritten "
                 f"(coverage {100 * self.coverage:.0f}%)"]
        for reason in self.graph_breaks:
            lines.append(f"  graph break: {reason}")
        lines += [str(r) for r in self.reports]
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"iters": self.config.iters, "graph_breaks": self.graph_breaks,
                "coverage": self.coverage, "residual_blocks": self.residual_blocks,
                "rewritten_blocks": self.rewritten_blocks,
                "graphs": [r.to_json() for r in self.reports]}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1, default=str)


def loss_of(output, loss_fn=None) -> torch.Tensor:
    """The scalar to differentiate: loss_fn(output), output.loss (HuggingFace), or a sum."""
    if loss_fn is not None:
        return loss_fn(output)
    if isinstance(output, torch.Tensor) and output.dim() == 0:
        return output
    if getattr(output, "loss", None) is not None:
        return output.loss
    leaves = [t for t in torch.utils._pytree.tree_leaves(output)
              if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]
    if not leaves:
        raise ValueError("hbp_compile: the model's output has no differentiable tensor; "
                         "pass loss_fn=")
    return sum(t.float().sum() for t in leaves)


def clone_args(args, kwargs):
    """Copies of the example inputs, so that a run leaves the caller's tensors (and .grad) alone."""
    def clone(t):
        return t.detach().clone().requires_grad_(t.requires_grad) \
            if isinstance(t, torch.Tensor) else t
    return (torch.utils._pytree.tree_map(clone, args), torch.utils._pytree.tree_map(clone, kwargs))


def explain(model: torch.nn.Module, *args, iters: int = 3, loss_fn=None, codegen: str = "eager",
            **kwargs) -> Explanation:
    """Compile a copy of `model` with hbp_backend, run one forward/backward, return the reports.

    Keyword arguments that name an hbp_backend option (gamma, strict, dump_dir, batched,
    min_length) configure the pass; every other one is a keyword input of the model
    (explain(hf_model, input_ids=ids, labels=ids)). `inputs=dict(...)` passes model inputs
    whose names clash with an option.
    """
    from . import hbp_backend
    from torch._dynamo.utils import counters

    option_names = {f.name for f in dataclasses.fields(HBPConfig)}
    options = {k: v for k, v in kwargs.items() if k in option_names}
    inputs = {k: v for k, v in kwargs.items() if k not in option_names and k != "inputs"}
    inputs.update(kwargs.get("inputs", {}))
    backend = hbp_backend(iters=iters, codegen=codegen, **options)
    model = copy.deepcopy(model)
    args, inputs = clone_args(args, inputs)
    breaks_before = dict(counters["graph_break"])
    loss = loss_of(torch.compile(model, backend=backend)(*args, **inputs), loss_fn)
    if loss.requires_grad:
        loss.backward()
    breaks = [f"{reason} (x{n - breaks_before.get(reason, 0)})"
              for reason, n in counters["graph_break"].items() if n > breaks_before.get(reason, 0)]
    return Explanation(list(backend.reports), breaks, backend.config)
