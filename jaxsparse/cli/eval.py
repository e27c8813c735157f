"""`jaxsparse eval`: perplexity, task accuracy and measured sparsity of a state, written as
JSON (the work is in `jaxsparse.evaluate`)."""

from __future__ import annotations

import argparse

from jaxsparse.cli.common import add_model_arguments
from jaxsparse.evaluate import DEFAULTS, Evaluator, ppl_token_ids, write_json_atomic


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--sparsity-state", metavar="DIR",
                        help="a state written by `jaxsparse calibrate` (default: dense)")
    parser.add_argument("--ppl", nargs="+", metavar="FILE",
                        help="text/JSONL files for perplexity")
    parser.add_argument("--tasks", metavar="FILE.jsonl",
                        help='multiple-choice tasks: {"context", "choices", "gold"} a line')
    parser.add_argument("--seq-len", type=int, default=DEFAULTS["seq_len"])
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    parser.add_argument("--max-tokens", type=int, default=DEFAULTS["max_tokens"],
                        help="perplexity tokens at most (0: all)")
    parser.add_argument("--num-tasks", type=int, default=DEFAULTS["num_tasks"],
                        help="size of the built-in task set (without --ppl/--tasks)")
    parser.add_argument("--json", required=True, metavar="OUT", help="where to write results")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from jaxsparse import data
    from jaxsparse.loading import load_model
    from jaxsparse.sparsity import load_state, read_state_meta

    if args.sparsity_state:
        read_state_meta(args.sparsity_state)  # fail fast, before loading the model
    builtin = not args.ppl and not args.tasks
    tasks = data.read_tasks(args.tasks) if args.tasks else (
        data.builtin_tasks(args.num_tasks) if builtin else None)
    lm = load_model(args.model, args.dtype)
    if lm.tokenizer is None:
        raise SystemExit(f"{lm.source}: no tokenizer; evaluation needs one")
    state = load_state(args.sparsity_state, lm.config) if args.sparsity_state else None
    ppl = None
    if args.ppl or builtin:
        ppl = ppl_token_ids(lm.config, lm.tokenizer, args.ppl, args.max_tokens or None)
    ev = Evaluator(lm.config, lm.params, lm.tokenizer, args.seq_len, args.batch_size,
                   progress=not args.no_progress)
    result = ev.evaluate(state, ppl, tasks)
    result["model_source"] = lm.source
    result["sparsity_state"] = args.sparsity_state
    result["data"] = {"perplexity": data.describe_sources(args.ppl, "evaluation") if ppl is not
                      None else None,
                      "tasks": args.tasks or ("built-in cloze (stdlib docstrings, evaluation "
                                              "split)" if tasks else None)}
    write_json_atomic(result, args.json)
    ppl_s = f"perplexity {result['perplexity']:.3f}  " if "perplexity" in result else ""
    task_s = (f"acc {result['tasks']['acc']:.3f} acc_norm {result['tasks']['acc_norm']:.3f}  "
              if "tasks" in result else "")
    print(f"{result['method']} s={result['target_sparsity']}: {ppl_s}{task_s}ffn sparsity "
          f"{result['measured_sparsity']['ffn']:.3f}  activated params "
          f"{result['activated_params_fraction']:.3f}  -> {args.json}")
    return 0
