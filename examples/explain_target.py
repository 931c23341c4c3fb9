"""A factory for `python -m hbp_compile explain examples/explain_target.py:tiny_gpt`."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import torch  # noqa: E402

from models import GPT  # noqa: E402


def tiny_gpt():
    """(model, example_inputs): a 2-layer GPT (L = 4) and one batch of token ids and targets."""
    torch.manual_seed(0)
    model = GPT(n_layer=2)
    return model, model.example_inputs(batch_size=2)
