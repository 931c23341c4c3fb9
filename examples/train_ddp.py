"""Data-parallel training with Highway-BP: a char-level GPT on Shakespeare under DDP.

    make ddp                                          # exact, k=1, k=2; 2 processes, gloo
    python examples/train_ddp.py --variants exact,k2 --steps 300
    python examples/train_ddp.py --world-size 8 --dist-backend nccl     # GPUs: same code

Each variant runs in its own process, which spawns `--world-size` ranks (gloo on CPU, one
thread each; NCCL with one GPU per rank). Every rank holds the same initial weights and draws
its own batches; DDP averages the gradients, which Highway-BP computed on each rank's batch.
The model is compiled as `torch.compile(DDP(model), backend=...)` with
`torch._dynamo.config.optimize_ddp = False`: one graph, so the whole stream (L = 12 residual
steps) is rewritten; DDPOptimizer's split (the default) would cut the stream at gradient-bucket
boundaries and leave the block each cut runs through exact (docs/distributed.md).
Rank 0 evaluates, shows the progress bar and writes the curves; the table and plot go to
examples/results (the same format as train_charlm.py's).
"""
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.elastic.utils.distributed import get_free_port

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import data  # noqa: E402
import ttq  # noqa: E402
from models import GPT  # noqa: E402

PRESET = dict(block_size=64, batch_size=16, steps=600, eval_every=50, lr=3e-3)   # per rank
DEFAULT_VARIANTS = "exact,k1,k2"
FULL_VARIANTS = DEFAULT_VARIANTS
VAL_BATCHES = 8


def rank_main(rank: int, args, port: int) -> None:
    """One rank: train the variant on its own batches; rank 0 reports."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(args.dist_backend, rank=rank, world_size=args.world_size)
    torch.set_num_threads(1)
    torch._dynamo.config.optimize_ddp = False        # one graph: the whole stream
    device = torch.device("cuda", rank) if args.dist_backend == "nccl" else torch.device("cpu")
    preset = dict(PRESET, **{k: v for k, v in (("steps", args.steps),
                                                ("eval_every", args.eval_every)) if v})
    corpus = data.shakespeare()
    ttq.seed_all(args.seed)                          # the same initial weights on every rank
    model = GPT(vocab=corpus.vocab, block_size=preset["block_size"], n_layer=6, n_head=4,
                n_embd=64).to(device)
    gen = torch.Generator().manual_seed(args.seed + 1 + 1000 * rank)      # this rank's batches
    B, T = preset["batch_size"], preset["block_size"]
    val_gen = torch.Generator().manual_seed(10_000 + args.seed)
    val = [tuple(t.to(device) for t in corpus.batch("val", 64, T, val_gen))
           for _ in range(VAL_BATCHES)]

    @torch.no_grad()
    def evaluate(m):
        return {"val_loss": sum(m(x, y).item() for x, y in val) / len(val)}

    try:
        variant = ttq.parse_variant(args.variant, preset["steps"])
        result = ttq.train(
            variant, model, steps=preset["steps"], eval_every=preset["eval_every"],
            lr=preset["lr"], wrap=DDP, progress=rank == 0,
            next_batch=lambda: tuple(t.to(device) for t in corpus.batch("train", B, T, gen)),
            loss_of=lambda f, batch: f(*batch), evaluate=evaluate,
            items_per_step=B * T * args.world_size, unit="tok",
            hbp_options=dict(codegen=args.codegen))
        if rank == 0:
            result["world_size"], result["dist_backend"] = args.world_size, args.dist_backend
            ttq.save_result(result, args, preset, model)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main():
    p = ttq.driver_parser(__doc__, "gpt", DEFAULT_VARIANTS, FULL_VARIANTS,
                          "exact, k<k>, sched:<fraction>=<k>,...; comma-separated")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--dist-backend", default="gloo", choices=["gloo", "nccl"])
    args = p.parse_args()
    if args.variant:
        mp.spawn(rank_main, args=(args, get_free_port()), nprocs=args.world_size)
        return

    def report_one(name, results, out_dir):
        ttq.report(results, "ddp_gpt", out_dir, "val_loss", "val loss",
                   higher_is_better=False, tolerance=0.01, relative=True, fmt="{:.3f}",
                   title=f"char-level Shakespeare, GPT (L = 12) under DDP, "
                         f"{args.world_size} x {args.dist_backend}",
                   time_label="training wall time (s, rank 0; one CPU thread per rank)")
    ttq.drive(args, __file__, "ddp", FULL_VARIANTS, report_one,
              ("--world-size", str(args.world_size), "--dist-backend", args.dist_backend))


if __name__ == "__main__":
    main()
