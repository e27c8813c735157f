"""`jaxsparse sweep`: calibrate and evaluate methods x sparsities, then print the table (the
work and the output layout are in `jaxsparse.sweep`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from jaxsparse.cli.common import add_model_arguments
from jaxsparse.sweep import sweep


def parse_list(text: str, kind=str) -> list:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise ValueError(f"empty list {text!r}")
    return [kind(x) for x in items]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from jaxsparse.calibrate import DEFAULTS as CAL
    from jaxsparse.evaluate import DEFAULTS as EV

    add_model_arguments(parser)
    parser.add_argument("--methods", default="cats,chess,chess+,teal",
                        help="comma-separated: cats, chess, chess+, teal")
    parser.add_argument("--sparsities", default="0.3,0.5,0.7", help="comma-separated, in [0, 1)")
    parser.add_argument("--data", nargs="+", metavar="FILE", help="calibration text")
    parser.add_argument("--tokens", type=int, default=CAL["tokens"], help="calibration tokens")
    parser.add_argument("--seq-len", type=int, default=CAL["seq_len"])
    parser.add_argument("--batch-size", type=int, default=CAL["batch_size"])
    parser.add_argument("--teal-allocation", choices=["uniform", "greedy"], default="uniform")
    parser.add_argument("--ppl", nargs="+", metavar="FILE", help="perplexity text")
    parser.add_argument("--tasks", metavar="FILE.jsonl")
    parser.add_argument("--max-tokens", type=int, default=EV["max_tokens"])
    parser.add_argument("--num-tasks", type=int, default=EV["num_tasks"])
    parser.add_argument("--no-dense", action="store_true", help="skip the dense baseline")
    parser.add_argument("--calibrate-only", action="store_true",
                        help="only write the missing states (statistics gathered once)")
    parser.add_argument("--sparsity-state", nargs="+", metavar="DIR",
                        help="states fitted elsewhere (learn, train-predictors) to evaluate "
                             "beside the calibrated ones")
    parser.add_argument("--out", required=True, metavar="DIR")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from jaxsparse.loading import load_model
    from jaxsparse.methods import check_sparsity, get_method

    methods = parse_list(args.methods)
    sparsities = [check_sparsity(s) for s in parse_list(args.sparsities)]
    for m in methods:
        get_method(m)
    lm = load_model(args.model, args.dtype)
    calib = {"tokens": args.tokens, "seq_len": args.seq_len, "batch_size": args.batch_size}
    ev = {"seq_len": args.seq_len, "batch_size": args.batch_size, "ppl": args.ppl,
          "tasks": args.tasks, "max_tokens": args.max_tokens, "num_tasks": args.num_tasks}
    options = {"teal": {"allocation": args.teal_allocation}}
    sweep(lm, methods, sparsities, args.out, args.data, calib, ev, options,
          include_dense=not args.no_dense, progress=not args.no_progress,
          calibrate_only=args.calibrate_only, extra_states=args.sparsity_state)
    if args.calibrate_only:
        print(f"states in {Path(args.out) / 'states'}")
        return 0
    print((Path(args.out) / "table.md").read_text())
    return 0
