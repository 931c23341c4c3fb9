"""Opt-in pytest plugin: log every hbp report the tests produce, to compare two commits.

    HBP_REPORT_LOG=before.jsonl PYTHONPATH=tests pytest -p report_log tests   (old commit)
    HBP_REPORT_LOG=after.jsonl  PYTHONPATH=tests pytest -p report_log tests   (new one)
    python tests/report_log.py before.jsonl after.jsonl         tests whose reports differ

One JSON line per report: the test id, and the report's streams (length, kind, x_0,
injections, blocks), groups (members, batched, why not, shared captures, saved, folded norms,
capture ops), skips and coverage: what a refactoring must leave unchanged.
"""
import collections
import json
import os
import sys

import pytest

_current = {"id": None}


def summary(r) -> dict:
    """The parts of a GraphReport that a behaviour-preserving change keeps."""
    return dict(
        fallback=bool(r.fallback_reason), coverage=round(r.coverage, 6), steps=r.residual_steps,
        skipped=sorted(s.reason[:60] for s in r.skipped),
        streams=[dict(length=s.length, kind=s.residual_kind, x0=s.x0, injections=s.injections,
                      blocks=[(b.first, b.last, b.group) for b in s.blocks],
                      groups=[(g.members, g.batched, g.reason, g.shared_captures, g.saved,
                               g.folded_norms, g.capture_ops) for g in s.groups])
                 for s in r.streams])


def pytest_configure(config):
    from hbp_compile import backend

    out, call = os.environ["HBP_REPORT_LOG"], backend.HBPBackend.__call__

    def logged(self, gm, example_inputs):
        compiled = call(self, gm, example_inputs)
        with open(out, "a") as f:
            f.write(json.dumps([_current["id"], summary(self.reports[-1])], default=str) + "\n")
        return compiled
    backend.HBPBackend.__call__ = logged


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    _current["id"] = item.nodeid
    yield


def _load(path) -> dict:
    logs = collections.defaultdict(list)
    with open(path) as f:
        for line in f:
            test, report = json.loads(line)
            logs[test].append(report)
    return logs


if __name__ == "__main__":
    before, after = map(_load, sys.argv[1:3])
    common = sorted(set(before) & set(after))
    differ = [t for t in common if before[t] != after[t]]
    print(f"{len(common)} tests with reports in both, {len(differ)} differ; "
          f"only before: {len(set(before) - set(after))}, only after: {len(set(after) - set(before))}")
    for t in differ:
        print("differs:", t)
