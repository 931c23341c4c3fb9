"""benchmarks/gpu_projection.py counts the kernels Inductor schedules: their matmul FLOPs equal
a count by hand, and a step's projection is at least its launches and its arithmetic."""
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

from bench_step import node_matmul_flops  # noqa: E402
from gpu_projection import H100, project, recording_kernels  # noqa: E402


def test_projection_counts_the_scheduled_matmuls():
    torch.manual_seed(0)
    B, d, h, o = 16, 32, 64, 8
    model = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, o))
    x = torch.randn(B, d)                       # needs no gradient: fc1's input grad is dead
    torch._dynamo.reset()
    with recording_kernels(node_matmul_flops) as graphs:
        torch.compile(model, backend="inductor")(x).sum().backward()
    assert len(graphs) == 2                                   # forward, backward
    # forward 2Bdh + 2Bho; backward: both weight grads, fc2's input grad
    assert sum(k["flops"] for k in graphs[0]) == 2 * B * (d * h + h * o)
    assert sum(k["flops"] for k in graphs[1]) == 2 * B * (d * h + 2 * h * o)
    p = project(graphs)
    assert p["kernels"] == sum(map(len, graphs)) and 2 <= p["chain"] <= p["kernels"]
    assert p["h100_ms"] * 1e-3 >= p["kernels"] * H100["LAUNCH_S"]
    assert p["h100_ms"] * 1e-3 >= p["flops"] / H100["MATMUL_FLOPS_PER_S"]
    assert p["h100_graphs_ms"] < p["h100_ms"]
    torch._dynamo.reset()
