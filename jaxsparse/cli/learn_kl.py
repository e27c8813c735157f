"""`jaxsparse learn-kl`: learn thresholds end to end against the dense model's next-token
distribution under a global activated-params budget (the work is in `jaxsparse.learn_kl`)."""

from __future__ import annotations

import argparse
import time

from jaxsparse.cli.common import (
    add_budget_arguments,
    add_data_argument,
    add_model_arguments,
    add_optimizer_arguments,
    add_output_arguments,
    add_sequence_arguments,
    add_threshold_training_arguments,
    at_least,
    check_text_files,
    checkpoint_dir,
    in_interval,
    load_model_for,
    text_provenance,
    training_sequences,
)
from jaxsparse.learn_kl import (
    DEFAULT_POINTS,
    DEFAULTS,
    KLSettings,
    describe,
    learn_kl,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument(
        "--target-fraction",
        required=True,
        type=in_interval(0.0, 1.0, lo_open=True),
        help="fraction of the blocks' linear weights read per token (activated params), e.g. 0.746",
    )
    parser.add_argument(
        "--points",
        default=",".join(DEFAULT_POINTS),
        help="comma-separated sparsification points to threshold (of q_in, "
        "kv_in, o_in, ffn_in, gate, down_in)",
    )
    parser.add_argument(
        "--granularity",
        choices=["layer", "channel"],
        default=DEFAULTS["granularity"],
        help="layer: one learned scale per layer and point on the calibrated "
        "per-channel profile; channel: one per channel",
    )
    parser.add_argument(
        "--init",
        nargs="+",
        metavar="DIR",
        help="states giving the base thresholds (each point from the first "
        "state that thresholds it; default: chess at "
        "--init-gate-sparsity and wina at --init-input-sparsity, "
        "calibrated on the training text)",
    )
    parser.add_argument(
        "--init-gate-sparsity",
        type=in_interval(0.0, 1.0, hi_open=True),
        default=DEFAULTS["init_gate_sparsity"],
    )
    parser.add_argument(
        "--init-input-sparsity",
        type=in_interval(0.0, 1.0, hi_open=True),
        default=DEFAULTS["init_input_sparsity"],
    )
    add_data_argument(parser, "training text")
    add_optimizer_arguments(
        parser, DEFAULTS, "Adam learning rate (log thresholds)", steps_help=None
    )
    add_threshold_training_arguments(parser, DEFAULTS, "lambda of lambda * (fraction - target)^2")
    add_sequence_arguments(parser, DEFAULTS, "training tokens", None)
    parser.add_argument(
        "--batch-seqs",
        type=at_least(1),
        default=DEFAULTS["batch_seqs"],
        help="sequences per optimizer step",
    )
    add_budget_arguments(
        parser,
        DEFAULTS["measure_tokens"],
        DEFAULTS["fraction_tol"],
        "training",
        " (by the final rescale)",
    )
    add_output_arguments(parser, "directory for the learned state")


def run(args: argparse.Namespace) -> int:
    from jaxsparse.calibrate import calibrate
    from jaxsparse.io import refuse_existing
    from jaxsparse.sparsity import load_state, read_state_meta, save_state

    points = tuple(p.strip() for p in args.points.split(",") if p.strip())
    settings = KLSettings(
        args.target_fraction,
        points,
        args.granularity,
        args.steps,
        args.lr,
        args.penalty,
        args.tau_start,
        args.tau_end,
        args.batch_seqs,
        args.seed,
    )
    refuse_existing(args.out, args.overwrite)
    check_text_files("--data", args.data)
    for d in args.init or []:
        read_state_meta(d)  # a bad directory fails before the model loads
    ckpt_dir = checkpoint_dir(args)
    t0 = time.time()
    lm = load_model_for(args, needs_tokenizer="learning")
    config = lm.config
    what, seqs = training_sequences(args, lm, args.seq_len)
    if args.init:
        inits = [load_state(d, config) for d in args.init]
        init_desc = [str(d) for d in args.init]
    else:
        sg, si = args.init_gate_sparsity, args.init_input_sparsity
        fitted = calibrate(
            config,
            lm.params,
            lm.tokenizer,
            ["chess", "wina"],
            sorted({sg, si}),
            args.data,
            args.tokens,
            args.seq_len,
            progress=not args.no_progress,
            model_source=lm.source,
        )
        inits = [fitted[("chess", sg)], fitted[("wina", si)]]
        init_desc = [f"chess {sg} and wina {si}, calibrated on the same data"]
    data_key = {
        "data": what,
        "tokens": int(seqs.size),
        "seq_len": args.seq_len,
        "init": init_desc,
        "measure_tokens": args.measure_tokens,
    }
    provenance = text_provenance(args, lm, seqs, args.seq_len)
    state, info = learn_kl(
        config,
        lm.params,
        seqs,
        inits,
        settings,
        ckpt_dir,
        args.save_every,
        args.resume,
        data_key,
        provenance,
        args.fraction_tol,
        args.measure_tokens,
        progress=not args.no_progress,
    )
    save_state(state, args.out, args.overwrite)
    print(
        f"{state.method} at activated-params fraction {args.target_fraction}: "
        f"{describe(info)}; {seqs.size} tokens in {time.time() - t0:.1f} s; wrote {args.out}"
    )
    return 0
