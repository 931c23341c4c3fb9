"""Time to quality: the training loop, curves, table and plots that train_charlm.py and
train_images.py share.

A variant is exact backprop (`torch.compile(model, backend="inductor")`) or Highway-BP at a fixed
iters k, on a stepwise schedule, or re-chosen by hbp_compile.calibrated every N steps (all
through hbp_compile.ScheduledIters: one compile per distinct k). Each variant
runs in its own process (a fresh Dynamo: an RNN module met by one backend is skipped by all
others in the process), from the same seed, on the same batches. Wall time counts training steps
only: validation is excluded, and a step that compiled (the first step of each k) counts as the
median step of that k; compile time is reported apart; calibration time is counted.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Optional

import torch

EXAMPLES = os.path.dirname(os.path.abspath(__file__))


@dataclasses.dataclass
class Variant:
    """Exact backprop, or Highway-BP at a fixed k, on a stepwise schedule, or calibrated."""

    name: str
    iters: Optional[int] = None                     # fixed k
    schedule: Optional[list[tuple[int, int]]] = None     # stepwise (first_step, k)
    calibrate_every: Optional[int] = None           # k re-chosen by hbp_compile.calibrated

    @property
    def exact(self) -> bool:
        return self.iters is None and self.schedule is None and self.calibrate_every is None


def parse_variant(spec: str, steps: int) -> Variant:
    """'exact', 'k2', 'sched:0=0,0.5=2' (first step as a fraction of the run = k) or
    'calib[:every]' (k re-chosen every `every` steps, a quarter of the run by default)."""
    if spec == "exact":
        return Variant("exact")
    if spec.startswith("k") and spec[1:].isdigit():
        return Variant(f"hbp k={spec[1:]}", iters=int(spec[1:]))
    if spec == "calib" or spec.startswith("calib:"):
        every = int(spec.split(":")[1]) if ":" in spec else max(steps // 4, 1)
        return Variant(f"hbp calibrated every {every} (cos >= {CALIB_COSINE})",
                       calibrate_every=every)
    if spec.startswith("sched:"):
        points = []
        for item in spec[len("sched:"):].split(","):
            at, k = item.split("=")
            points.append((int(round(float(at) * steps)), int(k)))
        label = " ".join(f"{k}@{at}" for at, k in points)
        return Variant(f"hbp schedule {label}", schedule=points)
    raise ValueError(f"unknown variant {spec!r}: use exact, k<int>, sched:<frac>=<k>,... or "
                     "calib[:<every>]")


CALIB_COSINE = 0.99                # the gradient cosine vs exact backprop a calibration asks for
CALIB_CANDIDATES = (0, 1, 2, 4)


def compile_variant(model: torch.nn.Module, variant: Variant, calib_inputs=None,
                    calib_seconds=None, **hbp_options):
    """The callable a training step goes through, and the ScheduledIters (None for exact)."""
    from hbp_compile import ScheduledIters, calibrated, stepwise

    if variant.exact:
        return torch.compile(model, backend="inductor"), None
    if variant.calibrate_every:
        # its own batches (the training batches stay those of every other variant); eager
        # codegen: each calibration compiles every candidate k on a copy of the model
        chooser = calibrated(model, calib_inputs, every=variant.calibrate_every,
                             target_cosine=CALIB_COSINE, candidates=CALIB_CANDIDATES,
                             codegen="eager")

        def schedule(step):
            t0 = time.perf_counter()
            k = chooser(step)
            calib_seconds[step] = calib_seconds.get(step, 0.0) + time.perf_counter() - t0
            return k
        schedule.choices = chooser.choices
    elif variant.schedule is not None:
        schedule = stepwise(variant.schedule)
    else:
        schedule = variant.iters
    scheduled = ScheduledIters(model, schedule, **hbp_options)
    return scheduled, scheduled


def train(variant: Variant, model: torch.nn.Module, *, steps: int, eval_every: int,
          lr: float, next_batch: Callable, loss_of: Callable, evaluate: Callable,
          items_per_step: int, unit: str, hbp_options: Optional[dict] = None,
          cosine_decay: bool = False, calib_inputs: Optional[Callable] = None,
          wrap: Optional[Callable] = None, progress: bool = True) -> dict:
    """Train one variant: the curve (step, train time, val metrics, k), timings and reports.
    `wrap(model)` is what gets compiled (DistributedDataParallel: train_ddp.py)."""
    from tqdm import tqdm

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    # cosine decay to lr / 10: a final quality that is not one noisy point of a constant-lr run
    decay = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.1 + 0.45 * (1 + math.cos(math.pi * min(s, steps) / steps))
        if cosine_decay else 1.0)
    calib_seconds: dict[int, float] = {}       # step -> seconds its calibration took
    step_fn, scheduled = compile_variant(wrap(model) if wrap else model, variant, calib_inputs,
                                         calib_seconds, **(hbp_options or {}))
    durations, compiled_at, curve = [], [], []
    graphs_seen = 0
    bar = tqdm(range(steps), desc=variant.name, mininterval=2.0, file=sys.stderr,
               disable=not progress)
    for step in bar:
        if step % eval_every == 0:
            curve.append(_point(step, durations, compiled_at, scheduled, evaluate(model),
                                calib_seconds))
        batch = next_batch()
        t0 = time.perf_counter()
        loss = loss_of(step_fn, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay.step()
        durations.append(time.perf_counter() - t0 - calib_seconds.get(step, 0.0))
        graphs = _graphs(scheduled)
        if step == 0 or graphs > graphs_seen:       # this step compiled
            compiled_at.append(step)
        graphs_seen = graphs
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}",
                            **{f"{unit}/s": f"{items_per_step / durations[-1]:.0f}"})
    curve.append(_point(steps, durations, compiled_at, scheduled, evaluate(model),
                        calib_seconds))
    result = {"variant": variant.name, "iters": variant.iters, "schedule": variant.schedule,
              "steps": steps, "curve": curve,
              "train_seconds": _train_seconds(durations, compiled_at, scheduled)
              + sum(calib_seconds.values()),
              "calibrate_seconds": sum(calib_seconds.values()),
              "compile_seconds": sum(durations[s] for s in compiled_at),
              "items_per_step": items_per_step, "unit": unit}
    if scheduled is not None:
        result["ks"] = scheduled.ks
        result["k_uses"] = [dataclasses.asdict(u) for u in scheduled.uses()]
        result["graphs_compiled"] = scheduled.compiles()
        result["calibrations"] = getattr(scheduled.schedule, "choices", None)
        result["reports"] = {k: [str(r) for r in b.reports] for k, b in scheduled.backends.items()}
        print(scheduled.summary(), file=sys.stderr)
    return result


def _is_exact(result: dict) -> bool:
    return result["variant"] == "exact"


def _graphs(scheduled) -> int:
    return 0 if scheduled is None else sum(scheduled.compiles().values())


def _steps_by_k(n: int, scheduled) -> list:
    return [None] * n if scheduled is None else scheduled.ks[:n]


def _train_seconds(durations, compiled_at, scheduled) -> float:
    """Sum of step times, each compiling step replaced by the median step of its k."""
    ks = _steps_by_k(len(durations), scheduled)
    total = 0.0
    for i, d in enumerate(durations):
        if i in compiled_at:
            same = [durations[j] for j in range(len(durations))
                    if ks[j] == ks[i] and j not in compiled_at]
            d = statistics.median(same) if same else d
        total += d
    return total


def _point(step, durations, compiled_at, scheduled, metrics, calib_seconds) -> dict:
    ks = _steps_by_k(len(durations), scheduled)
    seconds = _train_seconds(durations, compiled_at, scheduled) + sum(calib_seconds.values())
    return {"step": step, "seconds": seconds,
            "k": ks[-1] if ks else None, **metrics}


# -- one process per variant ------------------------------------------------------------------

def _variant_path(out_dir: str, spec: str) -> str:
    return os.path.join(out_dir, f"{spec.replace(':', '_').replace(',', '_')}.json")


def run_variants(script: str, specs: list[str], out_dir: str, extra_args: list[str]) -> list:
    """Run `script --variant spec --out file` once per spec, one after the other."""
    os.makedirs(out_dir, exist_ok=True)
    for spec in specs:
        cmd = [sys.executable, script, "--variant", spec, "--out",
               _variant_path(out_dir, spec), *extra_args]
        print(f"\n$ {' '.join(cmd)}", file=sys.stderr)
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return load_variants(specs, out_dir)


def split_specs(text: str) -> list[str]:
    """'exact,k0,sched:0=0,0.5=2' -> ['exact', 'k0', 'sched:0=0,0.5=2']."""
    specs = []
    for item in text.split(","):
        if specs and specs[-1].startswith("sched:") and "=" in item and ":" not in item:
            specs[-1] += "," + item
        else:
            specs.append(item)
    return specs


def driver_parser(doc: str, models: str, default_variants: str, full_variants: str,
                  variants_help: str) -> argparse.ArgumentParser:
    """The options both example scripts take (a script adds its own)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=models, help=f"{models.replace(',', ', ')} or a "
                   "comma-separated list")
    p.add_argument("--variants", default=default_variants, help=variants_help)
    p.add_argument("--full", action="store_true", help=f"variants {full_variants}")
    p.add_argument("--steps", type=int, default=0, help="override the preset's steps")
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--codegen", default="inductor", choices=["inductor", "eager"])
    p.add_argument("--results", default=None, help="results folder (default: examples/results "
                   "with --full, the committed table; else examples/results/quick)")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild table and plot from the variants' saved JSON")
    p.add_argument("--variant", help=argparse.SUPPRESS)        # child process: one variant
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p


def drive(args, script: str, prefix: str, full_variants: str, report_one: Callable,
          child_args: tuple = ()) -> None:
    """Per model: its variants in child processes (or their saved JSON with --report-only),
    then report_one(name, results, results_dir)."""
    specs = split_specs(full_variants if args.full else args.variants)
    quick = "" if args.full else "quick"       # a default run never overwrites the table
    args.results = args.results or os.path.join(EXAMPLES, "results", quick)
    for name in args.model.split(","):
        extra = ["--model", name, "--seed", str(args.seed), "--codegen", args.codegen,
                 *child_args]
        extra += ["--steps", str(args.steps)] if args.steps else []
        extra += ["--eval-every", str(args.eval_every)] if args.eval_every else []
        out_dir = os.path.join(args.results, f"{prefix}_{name}")
        results = load_variants(specs, out_dir) if args.report_only else \
            run_variants(script, specs, out_dir, extra)
        report_one(name, results, args.results)


def save_result(result: dict, args, preset: dict, model: torch.nn.Module) -> dict:
    """A child's result, with what produced it, written to args.out."""
    result.update(model=args.model, seed=args.seed, preset=preset,
                  parameters=sum(p.numel() for p in model.parameters()))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return result


# -- time to quality ----------------------------------------------------------------------------

def time_to_quality(results: list, metric: str, higher_is_better: bool,
                    tolerance: float, relative: bool) -> list:
    """Per variant: final quality, the steps and wall time to reach exact's final quality
    within `tolerance` (relative or absolute), and the quality reached in exact's wall time."""
    exact = next((r for r in results if _is_exact(r)), None)
    if exact is None:
        raise ValueError("time to quality needs the exact variant among the variants")
    final = exact["curve"][-1][metric]
    if higher_is_better:
        target = final - tolerance
        reached = lambda v: v >= target                          # noqa: E731
    else:
        target = final * (1 + tolerance) if relative else final + tolerance
        reached = lambda v: v <= target                          # noqa: E731
    budget = exact["train_seconds"]
    rows = []
    for r in results:
        hit = next((p for p in r["curve"] if reached(p[metric])), None)
        within = [p for p in r["curve"] if p["seconds"] <= budget * (1 + 1e-9)]
        rows.append({"variant": r["variant"], "final": r["curve"][-1][metric],
                     "steps": r["steps"], "seconds": r["train_seconds"],
                     "compile_seconds": r["compile_seconds"],
                     "step_ms": 1000 * r["train_seconds"] / r["steps"],
                     "ttq_steps": hit["step"] if hit else None,
                     "ttq_seconds": hit["seconds"] if hit else None,
                     "at_exact_time": within[-1][metric] if within else None})
    return [{"target": target, "metric": metric}] + rows


def table(ttq: list, metric_label: str, fmt: str = "{:.3f}") -> str:
    """The markdown table of time_to_quality's rows."""
    head, *rows = ttq
    lines = [f"target: {metric_label} {fmt.format(head['target'])} (exact's final, within the "
             "tolerance)", "",
             f"| variant | final {metric_label} | steps | train s | ms/step | compile s | "
             f"time to target (steps / s) | {metric_label} at exact's time |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ttq_cell = "not reached" if r["ttq_steps"] is None else \
            f"{r['ttq_steps']} / {r['ttq_seconds']:.0f}"
        at = "-" if r["at_exact_time"] is None else fmt.format(r["at_exact_time"])
        lines.append(f"| {r['variant']} | {fmt.format(r['final'])} | {r['steps']} | "
                     f"{r['seconds']:.0f} | {r['step_ms']:.1f} | {r['compile_seconds']:.0f} | "
                     f"{ttq_cell} | {at} |")
    return "\n".join(lines)


def plot(results: list, metric: str, label: str, title: str, path: str,
         target: Optional[float] = None,
         time_label: str = "training wall time (s, one CPU thread)") -> str:
    """Validation metric vs step and vs training wall time, one line per variant."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, r in enumerate(results):
        style = dict(color="k", lw=2) if _is_exact(r) else \
            dict(color=f"C{i}", lw=1.3)
        steps = [p["step"] for p in r["curve"]]
        secs = [p["seconds"] for p in r["curve"]]
        vals = [p[metric] for p in r["curve"]]
        ax1.plot(steps, vals, label=r["variant"], **style)
        ax2.plot(secs, vals, label=r["variant"], **style)
    finals = [r["curve"][-1][metric] for r in results]
    early = [p[metric] for r in results for p in r["curve"][len(r["curve"]) // 5:]]
    lo, hi = min(early + finals), max(early + finals)
    for ax, xlabel in ((ax1, "step"), (ax2, time_label)):
        ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))   # skip the first fifth
        if target is not None:
            ax.axhline(target, color="0.5", ls="--", lw=0.8)
        ax.set(xlabel=xlabel, ylabel=label)
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def load_variants(specs: list[str], out_dir: str) -> list:
    """The variants' JSON that run_variants wrote (to rebuild a table without training)."""
    results = []
    for spec in specs:
        with open(_variant_path(out_dir, spec)) as f:
            results.append(json.load(f))
    return results


def report(results: list, name: str, out_dir: str, metric: str, label: str, *,
           higher_is_better: bool, tolerance: float, relative: bool, fmt: str, title: str,
           **plot_options):
    """Table (markdown, printed and saved), curves (JSON) and the plot of one model."""
    rows = time_to_quality(results, metric, higher_is_better, tolerance, relative)
    text = table(rows, label, fmt)
    print(f"\n## {name}\n\n{text}\n")
    base = os.path.join(out_dir, name)
    with open(base + ".md", "w") as f:
        f.write(text + "\n")
    curves = [{k: v for k, v in r.items() if k not in ("reports", "ks")} for r in results]
    with open(base + ".json", "w") as f:
        json.dump({"ttq": rows, "results": curves}, f, indent=1)
    plot(results, metric, label, title, base + ".png", target=rows[0]["target"], **plot_options)
    print(f"wrote {base}.md, .json, .png")


def seed_all(seed: int) -> torch.Generator:
    """Seed torch and return the data generator every variant draws its batches from."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed + 1)
