"""Logging in the ecosystem's style: the `hbp_compile` logger, switched on by HBP_LOG.

    HBP_LOG=report            each graph's report at INFO, on stderr
    HBP_LOG=report,graphs     also the captured, rewritten, forward and backward graphs
    HBP_LOG=passes            each pass of the pipeline: its time (and its graph, in dumps)
    HBP_LOG=all               everything (same as report,graphs,passes)

Like TORCH_LOGS, it is read once, at import. Without it the logger stays silent unless the
application configures `logging.getLogger("hbp_compile")` itself.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger("hbp_compile")
ARTIFACTS = ("report", "graphs", "passes")
_enabled: set[str] = set()


def configure(spec: str | None) -> set[str]:
    """Enable the comma-separated artifacts in `spec` and attach a stderr handler once."""
    parts = {p.strip() for p in (spec or "").split(",") if p.strip()}
    if "all" in parts:
        parts = set(ARTIFACTS)
    unknown = parts - set(ARTIFACTS)
    if unknown:
        raise ValueError(f"HBP_LOG: unknown artifact(s) {sorted(unknown)}; known: {ARTIFACTS}")
    _enabled.clear()
    _enabled.update(parts)
    if parts:
        if not any(getattr(h, "_hbp", False) for h in log.handlers):
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("[hbp_compile] %(message)s"))
            handler._hbp = True
            log.addHandler(handler)
        log.setLevel(logging.INFO)
    return set(_enabled)


def enabled(artifact: str) -> bool:
    """Was `artifact` asked for (HBP_LOG or configure), or is the logger at DEBUG?"""
    return artifact in _enabled or log.isEnabledFor(logging.DEBUG)


configure(os.environ.get("HBP_LOG"))
