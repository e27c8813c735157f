"""The `jaxsparse` command line: one subcommand per job, each defined in its own module.

A subcommand module provides `add_arguments(parser)` and `run(args) -> int`; this file
only lists them, so that `jaxsparse --help` stays fast (modules import on use).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("convert.cli", "convert an HF directory or a .gguf file into a checkpoint"),
    "generate": ("jaxsparse.generate_cli", "generate text (dense, or with a sparsity state)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxsparse", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        module = importlib.import_module(module_name)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args._module.run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
