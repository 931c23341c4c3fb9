"""Markdown table of a bench_step.py result (for benchmarks/README.md).

    python benchmarks/table.py benchmarks/results/bench_step_cpu.json
"""
import json
import sys


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def projection(p, exact) -> str:
    """'ms (/ exact), ms (/ exact) | kernels / chain' of gpu_projection's figures."""
    if not p or "h100_ms" not in p:
        return "- | -"
    cells = []
    for key in ("h100_ms", "h100_graphs_ms"):
        ratio = f" ({p[key] / exact[key]:.2f})" if exact and exact.get(key) else ""
        cells.append(f"{p[key]:.2f}{ratio}")
    return ", ".join(cells) + f" | {p['kernels']} / {p['chain']}"


def table(results) -> str:
    rows = ["| preset | variant | median ms | IQR ms | / exact | matmul floor | kernels fw+bw "
            "| compile s (cold / warm) | peak MB (/ exact) | grad cosine | faults / step "
            "| H100 proj. ms (/ exact), CUDA graphs | kernels / chain | batched |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for mname, m in results["models"].items():
        vs = m["variants"]
        ex = vs.get("exact", {})
        for vname, r in vs.items():
            if "median_ms" not in r:
                rows.append(f"| {mname} | {vname} | {r.get('skipped') or r.get('error', '?')} "
                            "| | | | | | | | | | | |")
                continue
            f, e = r.get("matmul_flops"), ex.get("matmul_flops")
            floor = sum(f.values()) / sum(e.values()) if f and e and sum(e.values()) else None
            k = r.get("kernels")
            peak, epeak = r.get("peak_step_mb"), ex.get("peak_step_mb")
            mem = "-" if peak is None else f"{peak:.1f}" + (
                f" ({peak / epeak:.2f})" if epeak else "")
            b = r.get("groups_batched")
            rows.append(
                f"| {mname} | {vname} | {r['median_ms']:.2f} | {r['iqr_ms']:.2f} | "
                f"{fmt(r.get('ratio_vs_exact'), '.2f')} | {fmt(floor, '.2f')} | "
                f"{'-' if not k else '+'.join(str(v) for v in k.values())} | "
                f"{r['compile_s']:.1f} / {fmt(r.get('compile_warm_s'), '.1f')} | {mem} | "
                f"{fmt(r.get('grad_cosine'), '.4f')} | {fmt(r.get('median_minor_faults'), '.0f')} | "
                f"{projection(r.get('projection'), ex.get('projection'))} | "
                f"{'-' if b is None else ''.join('yn'[not x] for x in b) or 'none'} |")
    head = (f"{results['device_name']}, torch {results['torch']}, {results['threads']} "
            f"thread(s), {results['steps']} interleaved steps after {results['warmup']} warm-up")
    return head + "\n\n" + "\n".join(rows)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(table(json.load(f)))
