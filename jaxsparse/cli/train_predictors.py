"""`jaxsparse train-predictors`: train the Deja Vu FFN-neuron and head predictors and save a
dejavu state (the work is in `jaxsparse.predictors`)."""

from __future__ import annotations

import argparse
import time

from jaxsparse.cli.common import (
    add_data_argument,
    add_model_arguments,
    add_optimizer_arguments,
    add_output_arguments,
    add_sequence_arguments,
    at_least,
    check_text_files,
    load_model_for,
    text_provenance,
    training_sequences,
)
from jaxsparse.io import write_json_atomic
from jaxsparse.predictors import (
    DEFAULTS,
    PredictorError,
    check_settings,
    default_ks,
    dejavu_state,
    gather,
    train_predictors,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_data_argument(parser, "training text", "; the last 20%% of its sequences are held out")
    add_sequence_arguments(
        parser,
        DEFAULTS,
        "training tokens (at least two sequences)",
        "tokens per sequence",
        min_tokens=2,
    )
    parser.add_argument(
        "--ffn-rank",
        type=at_least(1),
        default=DEFAULTS["ffn_rank"],
        help="rank r of the FFN predictor d -> r -> m",
    )
    parser.add_argument(
        "--head-rank",
        type=at_least(1),
        default=DEFAULTS["head_rank"],
        help="rank r of the head predictor d -> r -> H",
    )
    parser.add_argument(
        "--ffn-k", type=at_least(1), help="FFN neurons kept per token (default m/2)"
    )
    parser.add_argument("--head-k", type=at_least(1), help="heads kept per token (default: all)")
    parser.add_argument(
        "--ffn-label-k", type=at_least(1), help="top-k of |g*u| labelled as mattering (default m/4)"
    )
    parser.add_argument(
        "--head-label-k", type=at_least(1), help="top-k heads by output norm labelled (default H/2)"
    )
    add_optimizer_arguments(
        parser, DEFAULTS, "Adam learning rate", "initialization and batch-order seed"
    )
    parser.add_argument(
        "--batch-tokens",
        type=at_least(1),
        default=DEFAULTS["batch_tokens"],
        help="tokens per optimizer step",
    )
    parser.add_argument("--report", metavar="FILE.json", help="write the held-out report here")
    add_output_arguments(parser, "directory for the dejavu state")


def run(args: argparse.Namespace) -> int:
    from jaxsparse.io import refuse_existing
    from jaxsparse.sparsity import save_state

    # Every argument that does not depend on the model's shapes is checked before it loads
    # (argparse checked the numbers); the ranks and ks are checked against its config.
    refuse_existing(args.out, args.overwrite)
    check_text_files("--data", args.data)
    if args.tokens < 2 * args.seq_len:
        raise PredictorError(
            f"--tokens {args.tokens}: need at least two sequences of "
            f"--seq-len {args.seq_len} (one is held out)"
        )
    t0 = time.time()
    lm = load_model_for(args, needs_tokenizer="training")
    config = lm.config
    ks = default_ks(config)
    for k in ks:
        if getattr(args, k) is not None:
            ks[k] = getattr(args, k)
    check_settings(config, args.ffn_rank, args.head_rank, **ks)
    what, seqs = training_sequences(args, lm, args.seq_len)
    data = gather(config, lm.params, seqs, progress=not args.no_progress)
    t_data = time.time() - t0
    weights, report = train_predictors(
        config,
        data,
        ks,
        args.ffn_rank,
        args.head_rank,
        args.steps,
        args.batch_tokens,
        args.lr,
        seed=args.seed,
        progress=not args.no_progress,
    )
    provenance = text_provenance(args, lm, seqs, args.seq_len)
    details = {
        "ffn_rank": args.ffn_rank,
        "head_rank": args.head_rank,
        "ffn_label_k": ks["ffn_label_k"],
        "head_label_k": ks["head_label_k"],
        "test_mean": report["mean"],
        "validation_mean": report["validation"],
    }
    state = dejavu_state(config, weights, ks["ffn_k"], ks["head_k"], provenance, details)
    save_state(state, args.out, args.overwrite)
    report.update(
        {
            "model_source": lm.source,
            "data": what,
            "data_seconds": round(t_data, 1),
            "seconds": round(time.time() - t0, 1),
            "state": str(args.out),
        }
    )
    if args.report:
        write_json_atomic(report, args.report)
    r = report["mean"]
    print(
        f"dejavu: test-split ffn_recall {r['ffn_recall']:.3f} ffn_precision "
        f"{r['ffn_precision']:.3f} head_recall {r['head_recall']:.3f} predicted sparsity "
        f"{r['predicted_sparsity']:.3f} ({report['seconds']:.0f} s); wrote {args.out}"
        + (f", {args.report}" if args.report else "")
    )
    return 0
