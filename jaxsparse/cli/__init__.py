"""The `jaxsparse` command line: one subcommand per job, each in its own module here.

A subcommand module provides `add_arguments(parser)` and `run(args) -> int` and keeps its
heavy imports (jax, transformers) inside `run`, so that `--help` stays fast. `run` checks
every argument it can before it loads a model. The library modules (calibrate, evaluate,
learn, predictors, sweep, data, generate, convert) parse no arguments.

One error convention for every command: a user error (a ValueError or OSError: bad path,
bad value; the library's DataError, StateError, ... subclass ValueError) becomes one line
`jaxsparse CMD: error: ...` on stderr and exit status 2, as argparse does for bad usage.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys
from collections.abc import Sequence

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("jaxsparse.cli.generate", "generate text (dense, or with a sparsity state)"),
    "calibrate": (
        "jaxsparse.cli.calibrate",
        "fit cats, chess, chess+, teal or wina thresholds on text",
    ),
    "eval": ("jaxsparse.cli.eval", "perplexity, task accuracy and measured sparsity of a state"),
    "sweep": (
        "jaxsparse.cli.sweep",
        "calibrate and evaluate methods x sparsities; table and plots",
    ),
    "data": ("jaxsparse.cli.data", "export the built-in corpus splits and multiple-choice tasks"),
    "learn": ("jaxsparse.cli.learn", "learn chess or teal thresholds with optax"),
    "learn-kl": (
        "jaxsparse.cli.learn_kl",
        (
            "learn thresholds end to end (KL to the dense model) "
            "at a target fraction of weights read"
        ),
    ),
    "train-predictors": (
        "jaxsparse.cli.train_predictors",
        "train Deja Vu FFN-neuron and head predictors",
    ),
    "convert": (
        "jaxsparse.cli.convert",
        "convert an HF directory or a .gguf file into a checkpoint",
    ),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows `(default: X)` after every option that has a default worth showing (not None,
    False or [], and not already named in its help)."""

    @staticmethod
    def shows(action: argparse.Action) -> bool:
        """Whether `action`'s default is worth showing."""
        return action.default not in (None, False, [], argparse.SUPPRESS) and bool(
            action.option_strings or action.nargs in ("?", "*")
        )

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not self.shows(action) or "default" in text:
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def version() -> str:
    """The installed package's version (from its metadata)."""
    try:
        return importlib.metadata.version("jaxsparse")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "unknown (not installed)"


def _command_parser(name: str, prog: str, parent=None) -> argparse.ArgumentParser:
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    description = getattr(module, "DESCRIPTION", help_text)
    if parent is None:
        p = argparse.ArgumentParser(
            prog=prog, description=description, formatter_class=HelpFormatter
        )
    else:
        p = parent.add_parser(
            name, help=help_text, description=description, formatter_class=HelpFormatter
        )
    module.add_arguments(p)
    for action in p._actions:  # argparse prints no help line, so no default, without help
        if action.help is None and action.option_strings and HelpFormatter.shows(action):
            action.help = "(default: %(default)s)"
    p.set_defaults(_module=module, command=name)
    return p


def build_parser() -> argparse.ArgumentParser:
    """The whole `jaxsparse` parser (imports every command module; `main` builds only the
    parser of the command it runs)."""
    parser = argparse.ArgumentParser(
        prog="jaxsparse", description=__doc__.splitlines()[0], formatter_class=HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        _command_parser(name, f"jaxsparse {name}", parent=sub)
    return parser


def run_command(name: str, argv: Sequence[str] | None, prog: str | None = None) -> int:
    """Parses `argv` for command `name` and runs it; returns the exit status (2 for a user
    error, reported as `PROG: error: ...`). `python -m convert` calls it too."""
    prog = prog or f"jaxsparse {name}"
    parser = _command_parser(name, prog)
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as e:  # argparse: --help (0) or bad usage (2), message already printed
        return _status(e)
    try:
        if name != "convert":  # converting compiles nothing worth keeping
            from jaxsparse.cli.common import enable_compilation_cache

            enable_compilation_cache()
        return args._module.run(args) or 0
    except (ValueError, OSError) as e:  # user errors: the message names the file or argument
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    """The `jaxsparse` console script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        return run_command(argv[0], argv[1:])
    try:  # no command, --help, --version or an unknown command
        build_parser().parse_args(argv)
    except SystemExit as e:
        return _status(e)
    return 2  # unreachable: a command is required


def _status(e: SystemExit) -> int:
    return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
