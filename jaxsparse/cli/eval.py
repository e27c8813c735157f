"""`jaxsparse eval`: perplexity, task accuracy and measured sparsity of a state, written as
JSON (the work is in `jaxsparse.evaluate`)."""

from __future__ import annotations

import argparse

from jaxsparse.cli.common import (
    add_eval_text_arguments,
    add_mesh_argument,
    add_model_arguments,
    at_least,
    check_text_files,
    load_model_for,
    mesh_for,
)
from jaxsparse.evaluate import DEFAULTS, Evaluator, ppl_token_ids, write_json_atomic


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument(
        "--sparsity-state",
        metavar="DIR",
        help="a state written by calibrate, learn or train-predictors (default: dense)",
    )
    parser.add_argument(
        "--seq-len",
        type=at_least(2),
        default=DEFAULTS["seq_len"],
        help="tokens per perplexity window; task rows are cut to it",
    )
    parser.add_argument(
        "--batch-size",
        type=at_least(1),
        default=DEFAULTS["batch_size"],
        help="rows per forward pass",
    )
    add_eval_text_arguments(parser, DEFAULTS)
    add_mesh_argument(parser, "evaluation")
    parser.add_argument("--json", required=True, metavar="OUT", help="where to write results")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def summary(result: dict) -> str:
    """One line: perplexity, accuracy (with its standard error), the measured sparsity of
    each point the state sparsifies, and the activated-parameter fraction."""
    parts = []
    if "perplexity" in result:
        parts.append(f"perplexity {result['perplexity']:.3f}")
    if "tasks" in result:
        t = result["tasks"]
        parts.append(
            f"acc {t['acc']:.3f} ± {t['acc_stderr']:.3f} acc_norm "
            f"{t['acc_norm']:.3f} ± {t['acc_norm_stderr']:.3f}"
        )
    per_point = result["measured_sparsity"]["per_point"]
    measured = {p: v for p, v in per_point.items() if v > 0}
    if measured:
        parts.append("measured sparsity " + " ".join(f"{p} {v:.3f}" for p, v in measured.items()))
    else:
        parts.append("measured sparsity: none (no point sparsified)")
    parts.append(f"activated params {result['activated_params_fraction']:.3f}")
    return f"{result['method']} s={result['target_sparsity']}: " + "  ".join(parts)


def run(args: argparse.Namespace) -> int:
    from jaxsparse import data
    from jaxsparse.sparsity import load_state, read_state_meta

    # Every input is read or checked before the model loads.
    if args.sparsity_state:
        read_state_meta(args.sparsity_state)
    check_text_files("--ppl", args.ppl)
    mesh = mesh_for(args)
    builtin = not args.ppl and not args.tasks
    tasks = (
        data.read_tasks(args.tasks)
        if args.tasks
        else (data.builtin_tasks(args.num_tasks) if builtin else None)
    )
    lm = load_model_for(args, needs_tokenizer="evaluation")
    state = load_state(args.sparsity_state, lm.config) if args.sparsity_state else None
    ppl = None
    if args.ppl or builtin:
        ppl = ppl_token_ids(lm.config, lm.tokenizer, args.ppl, args.max_tokens or None)
    ev = Evaluator(
        lm.config,
        lm.params,
        lm.tokenizer,
        args.seq_len,
        args.batch_size,
        mesh=mesh,
        progress=not args.no_progress,
    )
    result = ev.evaluate(state, ppl, tasks)
    result["model_source"] = lm.source
    result["sparsity_state"] = args.sparsity_state
    result["data"] = {
        "perplexity": data.describe_sources(args.ppl, "evaluation") if ppl is not None else None,
        "tasks": args.tasks
        or ("built-in cloze (stdlib docstrings, evaluation split)" if tasks else None),
    }
    write_json_atomic(result, args.json)
    print(f"{summary(result)}  -> {args.json}")
    return 0
