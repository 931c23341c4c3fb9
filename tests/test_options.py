"""Bad options: every wrong type, value or name raises a ValueError that names the option and
what it accepts, through hbp_backend(...) and through backend="hbp", options={...} (there at
the first call, as itself rather than wrapped by Dynamo)."""
import pytest
import torch

from hbp_compile import HBPConfig, hbp_backend

# option -> (bad values, words the message must hold)
BAD = {
    "iters": ([-1, 1.5, True, "3", None], "non-negative int"),
    "gamma": ([-0.1, 1.5, "0.2", True, None], "[0, 1]"),
    "codegen": (["triton", None, 1], "'inductor', 'eager'"),
    "strict": (["yes", 1, None], "bool"),
    "batched": (["yes", 1, None], "bool or 'auto'"),
    "min_length": ([0, -2, 1.0, True, "2"], "int >= 1"),
    "scan": (["fast", None, 3], "'sequential'"),
    "recompute": (["no", 0], "bool"),
    "fold": (["no", 0], "bool"),
    "rnn_modules": (["no", 0], "bool"),
    "rnn_time_chunks": ([0, -1, 1.5, True, "4", None], "int >= 1 or 'auto'"),
    "mode": (["fast", 1], "reduce-overhead"),
    "inductor_options": ([{"not_an_inductor_option": 1}, [1, 2], "x"], "Inductor config"),
    "dump_dir": ([3, ["a"]], "path"),
    "exclude": ([3, [1], ("h.0", None)], "module-path patterns"),
    "exact_first": ([-1, 1.5, True, "2"], "int >= 0"),
    "exact_last": ([-1, None, False], "int >= 0"),
}
CASES = [(name, value, words) for name, (values, words) in BAD.items() for value in values]


def test_every_option_has_bad_values_here():
    """A new option gets its bad values in this file, or this test fails."""
    import dataclasses
    assert {f.name for f in dataclasses.fields(HBPConfig)} == set(BAD)


@pytest.mark.parametrize("name,value,words", CASES, ids=[f"{n}={v!r}" for n, v, _ in CASES])
def test_hbp_backend_rejects(name, value, words):
    kwargs = {"iters": 2, name: value}
    with pytest.raises(ValueError, match=name) as info:
        hbp_backend(**kwargs)
    assert words in str(info.value)


def test_unknown_option_is_named_with_the_options():
    with pytest.raises(ValueError, match="unknown option 'itres'.*iters, gamma"):
        hbp_backend(itres=2)


def compile_with_options(options):
    torch._dynamo.reset()
    model = torch.nn.Linear(3, 3)
    torch.compile(model, backend="hbp", options=options)(torch.randn(2, 3)).sum().backward()


@pytest.mark.parametrize("name,value,words", CASES[::3], ids=[f"{n}={v!r}" for n, v, _ in CASES[::3]])
def test_string_backend_rejects(name, value, words):
    with pytest.raises(ValueError, match=name) as info:
        compile_with_options({"iters": 2, name: value})
    assert words in str(info.value)


def test_string_backend_unknown_option():
    with pytest.raises(ValueError, match="unknown option 'foo'"):
        compile_with_options({"foo": 1})
