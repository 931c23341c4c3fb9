"""Highway-BP through Inductor on CUDA: exact at k >= L, saved == recompute at small k.

    python benchmarks/cuda_check.py --out DIR/cuda_check.json

No test framework on the GPU machine: prints one line per check and writes JSON. The oracle is
eager autograd (exact once iters >= L) and, at k < L, the recompute=True backward (the
re-linearising path, which shares no saved-activation code) within float32 tolerance."""
import argparse
import copy
import json
import sys
import os

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_step as bs                                  # noqa: E402
from hbp_compile import hbp_backend                       # noqa: E402


def grads(model, batch, backend=None):
    m = copy.deepcopy(model)
    cm = m if backend is None else torch.compile(m, backend=backend)
    cm(*batch).backward()
    return torch.cat([p.grad.flatten().double() for p in m.parameters()]), backend


def rel(a, b):
    return float((a - b).norm() / b.norm())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="cuda_check.json")
    p.add_argument("--device", default="cuda", help="cpu: a dry run of this script")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False          # cuDNN's RNNs too
    dev = torch.device(args.device)
    out = dict(torch=torch.__version__, device=torch.cuda.get_device_name()
               if dev.type == "cuda" else "cpu", checks=[])
    def rnn_batch(d):                                     # T = 8 steps, batch 4, input 3
        return torch.randn(8, 4, 3, device=d), torch.randint(10, (8, 4), device=d)
    cases = [("gpt-sdpa", lambda: bs.GPT(n_layer=2, sdpa=True), 4, None),
             ("gpt", lambda: bs.GPT(n_layer=2), 4, None),
             ("mlp", lambda: bs.ResMLP(n_blocks=6), 6, None),
             # nn.GRU / nn.LSTM modules, 2 layers: cuDNN forward, Highway-BP over time
             ("nn-gru", lambda: bs.RNNModule("GRU", 8, 3, 16, layers=2), 8, rnn_batch),
             ("nn-lstm", lambda: bs.RNNModule("LSTM", 8, 3, 16, layers=2), 8, rnn_batch)]
    for name, make, L, make_batch in cases:
        torch.manual_seed(0)
        model = make().to(dev)
        batch = (make_batch or bs.CASES[name].make_batch)(dev)
        want, _ = grads(model, batch)
        for k, opts in [(L, {}), (1, {}), (1, dict(recompute=True)), (1, dict(batched=False))]:
            torch._dynamo.reset()
            try:
                got, be = grads(model, batch, hbp_backend(iters=k, **opts))
                rep = be.reports[-1]
                rec = dict(model=name, k=k, opts=opts, rel_err_vs_exact=rel(got, want),
                           coverage=rep.coverage, streams=[s.length for s in rep.streams], fallback=rep.fallback_reason,
                           groups=[(g.batched, g.saved, g.folded_norms)
                                   for s in rep.streams for g in s.groups])
                rec["grads"] = got
            except Exception as e:                        # noqa: BLE001
                rec = dict(model=name, k=k, opts=opts, error=f"{type(e).__name__}: {e}")
            out["checks"].append(rec)
        base = [c for c in out["checks"] if c["model"] == name and c.get("k") == 1
                and "grads" in c]
        for c in base[1:]:
            c["rel_err_vs_saved_k1"] = rel(c["grads"], base[0]["grads"])
    out["checks"] += random_checks(dev)
    for c in out["checks"]:
        c.pop("grads", None)
        if "random" in c:
            c["ok"] = c.get("error") is None and c["equal"]
            print(("PASS " if c["ok"] else "FAIL ") + json.dumps(c, default=str), flush=True)
            continue
        ok = c.get("error") is None and (c["k"] < 4 or c["rel_err_vs_exact"] < 1e-4) and \
            c.get("rel_err_vs_saved_k1", 0) < 1e-4 and not c.get("fallback") and \
            bool(c.get("streams"))
        c["ok"] = bool(ok)
        print(("PASS " if ok else "FAIL ") + json.dumps(c, default=str), flush=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1, default=str)
    print(f"{sum(c['ok'] for c in out['checks'])} passed, "
          f"{sum(not c['ok'] for c in out['checks'])} failed")


def random_checks(dev):
    """Seeded nn.TransformerEncoder with dropout (float64): the hbp forward is aot_eager's bit for
    bit (codegen="eager", the device's own dropout kernel), and exact Inductor's with
    fallback_random; the loss after reseeding too."""
    import torch._inductor.config as inductor_config
    import torch.nn as nn

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True, norm_first=True)
    enc = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False).double().to(dev).train()
    x = torch.randn(3, 5, 16, dtype=torch.float64, device=dev)

    def losses(backend):
        torch._dynamo.reset()
        cm = torch.compile(copy.deepcopy(enc), backend=backend)
        out = []
        for seed in (7, 7, 8):
            torch.manual_seed(seed)
            out.append(cm(x).pow(2).mean().item())
        return out

    recs = []
    for codegen, exact, patch in [("eager", "aot_eager", {}),
                                  ("inductor", "inductor", {"fallback_random": True})]:
        try:
            with inductor_config.patch(patch):
                want = losses(exact)
                got = losses(hbp_backend(iters=6, codegen=codegen))
            equal = got == want if codegen == "eager" else \
                all(abs(a - b) <= 1e-12 * abs(b) for a, b in zip(got, want))
            recs.append(dict(random="encoder-dropout", codegen=codegen, got=got, want=want,
                             equal=equal))
        except Exception as e:                            # noqa: BLE001
            recs.append(dict(random="encoder-dropout", codegen=codegen,
                             error=f"{type(e).__name__}: {e}"))
    return recs


if __name__ == "__main__":
    main()
