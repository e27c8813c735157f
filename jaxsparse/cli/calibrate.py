"""`jaxsparse calibrate`: fit cats, chess, chess+ or teal thresholds on text and save the
state (the work is in `jaxsparse.calibrate`)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from jaxsparse.calibrate import DEFAULTS, calibrate
from jaxsparse.cli.common import (
    add_data_argument,
    add_mesh_argument,
    add_model_arguments,
    add_output_arguments,
    add_sequence_arguments,
    add_sparsity_argument,
    at_least,
    check_text_files,
    in_interval,
    load_model_for,
    mesh_for,
    method_arg,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--method", required=True, help="cats, chess, chess+, teal or wina")
    add_sparsity_argument(parser)
    add_data_argument(parser, "text files or JSONL files with a 'text' field")
    add_sequence_arguments(
        parser,
        DEFAULTS,
        "calibration tokens",
        "tokens per calibration sequence",
        "sequences per forward pass",
    )
    parser.add_argument(
        "--teal-allocation",
        choices=["uniform", "greedy"],
        default="uniform",
        help="teal: the same sparsity for every layer and input, or a greedy "
        "allocation by block error",
    )
    parser.add_argument(
        "--teal-greedy-step",
        type=in_interval(0.0, 1.0, True, True),
        default=0.05,
        help="greedy: layer sparsity added per step",
    )
    parser.add_argument(
        "--teal-greedy-tokens",
        type=at_least(1),
        default=1024,
        help="greedy: calibration tokens the block error is measured on",
    )
    add_mesh_argument(parser, "calibration")
    add_output_arguments(parser, "directory to write the state to")


def method_options(args: argparse.Namespace) -> dict[str, dict]:
    opts = {
        "allocation": args.teal_allocation,
        "greedy_step": args.teal_greedy_step,
        "greedy_tokens": args.teal_greedy_tokens,
    }
    return {"teal": opts, "wina": dict(opts)}  # wina allocates its groups as teal does


def run(args: argparse.Namespace) -> int:
    from jaxsparse.io import refuse_existing
    from jaxsparse.sparsity import save_state

    # Cheap checks first: a bad argument must not cost a model load.
    s = args.sparsity
    method_arg(args.method)
    refuse_existing(args.out, args.overwrite)
    check_text_files("--data", args.data)
    mesh = mesh_for(args)
    t0 = time.time()
    lm = load_model_for(args, needs_tokenizer="calibration")
    states = calibrate(
        lm.config,
        lm.params,
        lm.tokenizer,
        [args.method],
        [s],
        args.data,
        args.tokens,
        args.seq_len,
        args.batch_size,
        method_options(args),
        mesh=mesh,
        model_source=lm.source,
        progress=not args.no_progress,
    )
    state = states[(args.method, s)]
    save_state(state, args.out, args.overwrite)
    print(
        f"{args.method} at sparsity {s}: calibrated on {state.meta.provenance['tokens']} "
        f"tokens in {time.time() - t0:.1f} s; wrote {Path(args.out)}"
    )
    return 0
