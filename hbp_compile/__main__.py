"""Command line: python -m hbp_compile explain path/to/script.py:factory [--iters K] [--dump DIR]

`factory` is a function of the script returning (model, example_inputs): example_inputs a tuple
of positional inputs or a dict of keyword inputs. The report goes to stdout (--json for JSON).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys


def load_factory(target: str):
    """"path/to/script.py:factory" -> the factory function."""
    path, sep, name = target.rpartition(":")
    if not sep or not path or not name:
        raise SystemExit(f"expected path/to/script.py:factory, got {target!r}")
    if not os.path.exists(path):
        raise SystemExit(f"no such file: {path}")
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    spec = importlib.util.spec_from_file_location("hbp_target", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, name):
        raise SystemExit(f"{path} has no function {name!r}")
    return getattr(module, name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hbp_compile")
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("explain", help="compile a model, run one step, print the report")
    ex.add_argument("target", help="path/to/script.py:factory returning (model, example_inputs)")
    ex.add_argument("--iters", type=int, default=3)
    ex.add_argument("--gamma", type=float, default=0.0)
    ex.add_argument("--codegen", default="eager", choices=["eager", "inductor"])
    ex.add_argument("--dump", default=None, help="write graphs and reports to this directory")
    ex.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)

    from . import explain

    model, example_inputs = load_factory(args.target)()
    positional, keywords = ((), example_inputs) if isinstance(example_inputs, dict) else \
        (tuple(example_inputs), {})
    result = explain(model, *positional, iters=args.iters, gamma=args.gamma,
                     codegen=args.codegen, dump_dir=args.dump, inputs=keywords)
    print(result.dumps() if args.json else result)
    if args.dump:
        print(f"graphs and reports written to {args.dump}/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
