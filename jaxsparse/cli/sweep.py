"""`jaxsparse sweep`: calibrate and evaluate methods x sparsities, then print the table (the
work and the output layout are in `jaxsparse.sweep`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from jaxsparse.calibrate import DEFAULTS as CAL
from jaxsparse.cli.common import (
    add_budget_arguments,
    add_data_argument,
    add_eval_text_arguments,
    add_mesh_argument,
    add_model_arguments,
    add_output_arguments,
    add_sequence_arguments,
    check_text_files,
    in_interval,
    load_model_for,
    mesh_for,
    method_arg,
    sparsity,
)
from jaxsparse.evaluate import DEFAULTS as EV
from jaxsparse.sweep import check_out_dir, sweep, sweep_settings


def parse_list(text: str, kind=str) -> list:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise ValueError(f"empty list {text!r}")
    return [kind(x) for x in items]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument(
        "--methods",
        default="cats,chess,chess+,teal",
        help="comma-separated: cats, chess, chess+, teal, wina",
    )
    parser.add_argument("--sparsities", default="0.3,0.5,0.7", help="comma-separated, in [0, 1)")
    add_data_argument(parser, "calibration text")
    add_sequence_arguments(
        parser,
        CAL,
        "calibration tokens",
        "tokens per sequence (calibration and perplexity)",
        "sequences per forward pass",
    )
    parser.add_argument(
        "--teal-allocation",
        choices=["uniform", "greedy"],
        default="uniform",
        help="teal: the same sparsity everywhere, or a greedy allocation",
    )
    add_eval_text_arguments(parser, EV)
    parser.add_argument(
        "--fractions",
        metavar="F,F,...",
        help="compare at equal activated-params fractions instead of equal "
        "sparsities: each method's sparsity (a dejavu state's ffn_k) is "
        "solved on calibration text to read this fraction of the blocks' "
        "linear weights, e.g. 0.5,0.6,0.75 (jaxsparse.sweep_budget)",
    )
    add_budget_arguments(parser, 2048, 2e-3, "calibration", " (with --fractions)")
    add_mesh_argument(parser, "calibration and evaluation")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense baseline")
    parser.add_argument(
        "--calibrate-only",
        action="store_true",
        help="only write the missing states (statistics gathered once)",
    )
    parser.add_argument(
        "--sparsity-state",
        nargs="+",
        metavar="DIR",
        help="states fitted elsewhere (learn, train-predictors) to evaluate "
        "beside the calibrated ones",
    )
    add_output_arguments(
        parser,
        "output directory; a rerun reuses what it holds if the settings match, and refuses "
        "otherwise",
        "first remove the states, results, tables and plots a sweep with other settings "
        "left in --out",
        out_metavar="DIR",
    )


def run(args: argparse.Namespace) -> int:
    from jaxsparse import data
    from jaxsparse.sparsity import read_state_meta

    # Every argument is checked before the model loads (argparse checked the numbers).
    methods = [method_arg(m, "--methods") for m in parse_list(args.methods)]
    try:
        sparsities = [sparsity(s) for s in parse_list(args.sparsities)]
    except (ValueError, argparse.ArgumentTypeError) as e:
        raise ValueError(f"--sparsities {args.sparsities}: {e}") from None
    check_text_files("--data", args.data)
    check_text_files("--ppl", args.ppl)
    if args.tasks:
        data.read_tasks(args.tasks)
    for d in args.sparsity_state or []:
        read_state_meta(d)
    mesh = mesh_for(args)
    calib = {"tokens": args.tokens, "seq_len": args.seq_len, "batch_size": args.batch_size}
    ev = {
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "ppl": args.ppl,
        "tasks": args.tasks,
        "max_tokens": args.max_tokens,
        "num_tasks": args.num_tasks,
    }
    options = {
        "teal": {"allocation": args.teal_allocation},
        "wina": {"allocation": args.teal_allocation},
    }
    if args.fractions:
        return run_fractions(args, methods, calib, ev, options, mesh)
    if not args.overwrite:  # all but the model's identity, which needs the model
        settings = sweep_settings(None, None, args.data, calib, options, ev)
        check_out_dir(args.out, settings, args.calibrate_only, ignore=("model", "dtype"))
    lm = load_model_for(args)
    sweep(
        lm,
        methods,
        sparsities,
        args.out,
        args.data,
        calib,
        ev,
        options,
        include_dense=not args.no_dense,
        progress=not args.no_progress,
        calibrate_only=args.calibrate_only,
        extra_states=args.sparsity_state,
        overwrite=args.overwrite,
        mesh=mesh,
    )
    if args.calibrate_only:
        print(f"states in {Path(args.out) / 'states'}")
        return 0
    print((Path(args.out) / "table.md").read_text())
    return 0


def run_fractions(
    args: argparse.Namespace, methods: list[str], calib: dict, ev: dict, options: dict, mesh=None
) -> int:
    """`--fractions`: the equal-budget sweep (`jaxsparse.sweep_budget`)."""
    from jaxsparse.sweep_budget import sweep_fractions

    try:
        fractions = [in_interval(0.0, 1.0, lo_open=True)(f) for f in parse_list(args.fractions)]
    except (ValueError, argparse.ArgumentTypeError) as e:
        raise ValueError(f"--fractions {args.fractions}: {e}") from None
    lm = load_model_for(args)
    sweep_fractions(
        lm,
        methods,
        fractions,
        args.out,
        args.data,
        calib,
        ev,
        options,
        extra_states=args.sparsity_state,
        include_dense=not args.no_dense,
        measure_tokens=args.measure_tokens,
        tol=args.fraction_tol,
        progress=not args.no_progress,
        mesh=mesh,
    )
    print((Path(args.out) / "table.md").read_text())
    return 0
