"""The `jaxsparse` command line: one subcommand per job, each defined in its own module.

A subcommand module provides `add_arguments(parser)` and `run(args) -> int` and keeps
its heavy imports (jax, transformers) inside `run`, so that `--help` stays fast. This
file only lists them and turns a user error (a ValueError or OSError: bad path, bad
value; the library's DataError, StateError, ... subclass ValueError) into one line on
stderr and exit status 2, as argparse does for bad usage.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("jaxsparse.generate_cli", "generate text (dense, or with a sparsity state)"),
    "calibrate": ("jaxsparse.calibrate", "fit cats, chess, chess+ or teal thresholds on text"),
    "eval": ("jaxsparse.evaluate", "perplexity, task accuracy and measured sparsity of a state"),
    "sweep": ("jaxsparse.sweep", "calibrate and evaluate methods x sparsities; table and plots"),
    "data": ("jaxsparse.data", "export the built-in corpus splits and multiple-choice tasks"),
    "learn": ("jaxsparse.learn", "learn chess or teal thresholds with optax"),
    "train-predictors": ("jaxsparse.predictors", "train Deja Vu FFN-neuron and head predictors"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxsparse", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in PASSTHROUGH.items():
        sub.add_parser(name, help=help_text, add_help=False)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        module = importlib.import_module(module_name)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


# Subcommands that own their whole argument parser: name -> (module, help).
PASSTHROUGH: dict[str, tuple[str, str]] = {
    "convert": ("convert.cli", "convert an HF directory or a .gguf file into a checkpoint"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in PASSTHROUGH:
        module = importlib.import_module(PASSTHROUGH[argv[0]][0])
        return module.main(argv[1:], prog=f"jaxsparse {argv[0]}")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args._module.run(args) or 0
    except (ValueError, OSError) as e:  # user errors: the message names the file or argument
        print(f"jaxsparse {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
