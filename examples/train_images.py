"""Time to quality on scikit-learn's 8x8 digits: residual CNNs, exact backprop vs Highway-BP.

    make images                                      # the default variants, both CNNs
    python examples/train_images.py --full           # the table of examples/README.md
    python examples/train_images.py --model post --variants exact,k1

Two residual CNNs of 8 blocks (L = 8) at 32 channels on 8x8 images, BatchNorm in train mode:
pre-activation blocks `x + conv(relu(bn(conv(relu(bn(x))))))` (identity residual) and
post-activation blocks `relu(x + bn(conv(relu(bn(conv(x))))))` (K_l = diag(relu')). Quality is
validation accuracy (297 held-out images); time to quality is exact's final accuracy within
1 point. AdamW, the learning rate decays (cosine) to a tenth. Every variant starts from the
same weights and sees the same batches; one CPU thread.
"""
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data  # noqa: E402
import ttq  # noqa: E402

PRESET = dict(batch_size=64, steps=600, eval_every=25, lr=2e-3, cosine_decay=True, channels=32,
              blocks=8)
DEFAULT_VARIANTS = "exact,k0,k2"
FULL_VARIANTS = "exact,k0,k1,k2,k4,sched:0=0,0.5=2,calib"


def conv3(c_in, c_out):
    return nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)


class PreActBlock(nn.Module):
    """z = conv(relu(bn(conv(relu(bn(x)))))); the step is x + z."""

    def __init__(self, c):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c), conv3(c, c)
        self.bn2, self.conv2 = nn.BatchNorm2d(c), conv3(c, c)

    def forward(self, x):
        return x + self.conv2(F.relu(self.bn2(self.conv1(F.relu(self.bn1(x))))))


class PostActBlock(nn.Module):
    """The original ResNet block: relu(x + bn(conv(relu(bn(conv(x))))))."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = conv3(c, c), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = conv3(c, c), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class ResCNN(nn.Module):
    """Stem conv, `blocks` residual blocks at full 8x8 resolution, pooled linear head."""

    def __init__(self, block, channels=32, blocks=8, classes=10):
        super().__init__()
        self.stem = nn.Sequential(conv3(1, channels), nn.BatchNorm2d(channels), nn.ReLU())
        self.blocks = nn.Sequential(*(block(channels) for _ in range(blocks)))
        self.norm = nn.BatchNorm2d(channels) if block is PreActBlock else nn.Identity()
        self.head = nn.Linear(channels, classes)

    def logits(self, x):
        h = F.relu(self.norm(self.blocks(self.stem(x))))
        return self.head(h.mean((2, 3)))

    def forward(self, x, y):
        return F.cross_entropy(self.logits(x), y)


def build(name: str) -> nn.Module:
    blocks = {"pre": PreActBlock, "post": PostActBlock}
    if name not in blocks:
        raise ValueError(f"unknown model {name!r}: pre or post")
    return ResCNN(blocks[name], PRESET["channels"], PRESET["blocks"])


def run_one(args) -> dict:
    """Child process: train one variant of one CNN, write its JSON."""
    torch.set_num_threads(1)
    preset = dict(PRESET, **{k: v for k, v in
                  (("steps", args.steps), ("eval_every", args.eval_every)) if v})
    images = data.digits()
    gen = ttq.seed_all(args.seed)
    model = build(args.model)

    @torch.no_grad()
    def evaluate(m):
        m.eval()                                   # BatchNorm's running statistics
        logits = m.logits(images.x_val)
        m.train()
        return {"val_acc": 100.0 * (logits.argmax(1) == images.y_val).float().mean().item(),
                "val_loss": F.cross_entropy(logits, images.y_val).item()}

    variant = ttq.parse_variant(args.variant, preset["steps"])
    B = preset["batch_size"]
    calib_gen = torch.Generator().manual_seed(20_000 + args.seed)   # calib variant's batches
    result = ttq.train(variant, model, steps=preset["steps"], eval_every=preset["eval_every"],
                       lr=preset["lr"], next_batch=lambda: images.batch(B, gen),
                       loss_of=lambda f, batch: f(*batch), evaluate=evaluate,
                       items_per_step=B, unit="img", hbp_options=dict(codegen=args.codegen),
                       cosine_decay=preset["cosine_decay"],
                       calib_inputs=lambda: images.batch(B, calib_gen))
    return ttq.save_result(result, args, preset, model)


def main():
    p = ttq.driver_parser(__doc__, "pre,post", DEFAULT_VARIANTS, FULL_VARIANTS,
                          "exact, k<k>, sched:<fraction>=<k>,..., calib[:<every>] "
                          "(comma-separated)")
    args = p.parse_args()
    if args.variant:
        run_one(args)
        return

    def report_one(name, results, out_dir):
        ttq.report(results, f"images_{name}", out_dir, "val_acc", "val accuracy %",
                   higher_is_better=True, tolerance=1.0, relative=False, fmt="{:.1f}",
                   title=f"8x8 digits, {name}-activation residual CNN (L = {PRESET['blocks']})")
    ttq.drive(args, __file__, "images", FULL_VARIANTS, report_one)


if __name__ == "__main__":
    main()
