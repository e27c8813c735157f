"""`jaxsparse learn`: learn chess or teal thresholds with optax, resumable from checkpoints
(the work is in `jaxsparse.learn`)."""

from __future__ import annotations

import argparse
import time

from jaxsparse.cli.common import (
    add_data_argument,
    add_model_arguments,
    add_optimizer_arguments,
    add_output_arguments,
    add_sequence_arguments,
    add_sparsity_argument,
    add_threshold_training_arguments,
    at_least,
    check_text_files,
    checkpoint_dir,
    load_model_for,
    text_provenance,
    training_sequences,
)
from jaxsparse.learn import DEFAULTS, POINTS, LearnError, LearnSettings, learn


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument(
        "--method",
        required=True,
        choices=sorted(POINTS),
        help="chess: per-channel FFN thresholds; teal: the inputs of every linear layer",
    )
    add_sparsity_argument(parser)
    add_data_argument(parser, "training text")
    parser.add_argument(
        "--init",
        metavar="DIR",
        help="calibrated state to start from (default: calibrate --method on the same data)",
    )
    add_optimizer_arguments(
        parser, DEFAULTS, "Adam learning rate (on log thresholds)", "batch order seed"
    )
    add_threshold_training_arguments(
        parser, DEFAULTS, "lambda of the sparsity penalty lambda * (s - S)^2"
    )
    add_sequence_arguments(
        parser,
        {"tokens": DEFAULTS["tokens"]},  # --seq-len: its default depends on --method
        "training tokens",
        "default 512 (chess), 128 (teal: whole blocks on sequences)",
    )
    parser.add_argument(
        "--batch-tokens",
        type=at_least(1),
        default=DEFAULTS["batch_tokens"],
        help="tokens per optimizer step",
    )
    add_output_arguments(parser, "directory for the learned state")


def run(args: argparse.Namespace) -> int:
    from jaxsparse.calibrate import calibrate
    from jaxsparse.io import refuse_existing
    from jaxsparse.sparsity import load_state, read_state_meta, save_state

    # Every argument is checked before the model loads (argparse checked the numbers).
    s = args.sparsity
    refuse_existing(args.out, args.overwrite)
    check_text_files("--data", args.data)
    if args.init:
        meta = read_state_meta(args.init)
        if meta.method != args.method:
            raise LearnError(
                f"--init {args.init} holds a {meta.method!r} state; --method "
                f"{args.method} starts from a {args.method!r} state"
            )
    ckpt_dir = checkpoint_dir(args)
    seq_len = args.seq_len or (
        DEFAULTS["seq_len"] if args.method == "chess" else DEFAULTS["teal_seq_len"]
    )
    t0 = time.time()
    lm = load_model_for(args, needs_tokenizer="learning")
    config = lm.config
    what, seqs = training_sequences(args, lm, seq_len)
    if args.init:
        init = load_state(args.init, config)
    else:
        init = calibrate(
            config,
            lm.params,
            lm.tokenizer,
            [args.method],
            [s],
            args.data,
            args.tokens,
            seq_len,
            progress=not args.no_progress,
            model_source=lm.source,
        )[(args.method, s)]
    settings = LearnSettings(
        args.method,
        s,
        args.steps,
        args.lr,
        args.penalty,
        args.tau_start,
        args.tau_end,
        args.batch_tokens,
        args.seed,
    )
    data_key = {
        "data": what,
        "tokens": int(seqs.size),
        "seq_len": seq_len,
        "init": str(args.init) if args.init else "calibrated on the same data",
        "init_target_sparsity": init.target_sparsity,
    }
    provenance = text_provenance(args, lm, seqs, seq_len)
    state, info = learn(
        config,
        lm.params,
        seqs,
        init,
        settings,
        ckpt_dir,
        args.save_every,
        args.resume,
        data_key,
        provenance,
        progress=not args.no_progress,
    )
    save_state(state, args.out, args.overwrite)
    print(
        f"{state.method} at sparsity {s}: {info['final_step']} steps on {seqs.size} tokens "
        f"in {time.time() - t0:.1f} s (train error {info['trace'][0]['err']:.4f} at step "
        f"{info['trace'][0]['step']} -> {info['trace'][-1]['err']:.4f}); wrote {args.out}"
    )
    return 0
