"""Dumps: the captured, rewritten, forward and backward graphs and the report, as files."""
from __future__ import annotations

import os

import torch.fx as fx


def readable(g) -> str:
    """A graph as readable Python (print_readable); text graphs as they are."""
    return g.print_readable(print_output=False) if isinstance(g, fx.GraphModule) else str(g)


def dump_report(dump_dir, report) -> list[str]:
    """Write graph `report.index`'s graphs (readable Python) and report (text, JSON)."""
    os.makedirs(dump_dir, exist_ok=True)
    prefix = os.path.join(dump_dir, f"graph_{report.index}")
    written = []
    for name, g in report.graphs.items():
        text = readable(g)
        path = f"{prefix}_{name}.py"
        with open(path, "w") as f:
            f.write(text)
        written.append(path)
    for ext, text in (("txt", str(report)), ("json", report.dumps())):
        with open(f"{prefix}_report.{ext}", "w") as f:
            f.write(text + "\n")
        written.append(f"{prefix}_report.{ext}")
    return written
