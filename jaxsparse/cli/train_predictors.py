"""`jaxsparse train-predictors`: train the Deja Vu FFN-neuron and head predictors and save a
dejavu state (the work is in `jaxsparse.predictors`)."""

from __future__ import annotations

import argparse
import datetime
import time

from jaxsparse.cli.common import add_model_arguments
from jaxsparse.evaluate import write_json_atomic
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
    parser.add_argument("--data", nargs="+", metavar="FILE",
                        help="training text (default: the calibration split of the built-in "
                             "corpus; the last 20%% of its sequences are held out)")
    parser.add_argument("--tokens", type=int, default=DEFAULTS["tokens"])
    parser.add_argument("--seq-len", type=int, default=DEFAULTS["seq_len"])
    parser.add_argument("--ffn-rank", type=int, default=DEFAULTS["ffn_rank"])
    parser.add_argument("--head-rank", type=int, default=DEFAULTS["head_rank"])
    parser.add_argument("--ffn-k", type=int, help="FFN neurons kept per token (default m/2)")
    parser.add_argument("--head-k", type=int, help="heads kept per token (default: all)")
    parser.add_argument("--ffn-label-k", type=int,
                        help="top-k of |g*u| labelled as mattering (default m/4)")
    parser.add_argument("--head-label-k", type=int,
                        help="top-k heads by output norm labelled (default H/2)")
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    parser.add_argument("--batch-tokens", type=int, default=DEFAULTS["batch_tokens"])
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    parser.add_argument("--out", required=True, help="directory for the dejavu state")
    parser.add_argument("--report", metavar="FILE.json", help="held-out report")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    import jax

    from jaxsparse import data as data_mod
    from jaxsparse.io import refuse_existing
    from jaxsparse.loading import load_model
    from jaxsparse.sparsity import save_state

    refuse_existing(args.out, args.overwrite)
    if args.tokens < 2 * args.seq_len:
        raise PredictorError(f"--tokens {args.tokens}: need at least two sequences of "
                             f"--seq-len {args.seq_len} (one is held out)")
    t0 = time.time()
    lm = load_model(args.model, args.dtype)
    if lm.tokenizer is None:
        raise SystemExit(f"{lm.source}: no tokenizer; training needs one to read text")
    config = lm.config
    ks = default_ks(config)
    for k in ks:
        if getattr(args, k) is not None:
            ks[k] = getattr(args, k)
    check_settings(config, args.ffn_rank, args.head_rank, **ks)
    what = data_mod.describe_sources(args.data, "calibration")
    docs = data_mod.load_documents(args.data, "calibration")
    eos = data_mod.eos_token_id(config, lm.tokenizer)
    seqs = data_mod.pack_tokens(docs, lm.tokenizer, eos, args.seq_len, args.tokens, what)
    data = gather(config, lm.params, seqs, progress=not args.no_progress)
    t_data = time.time() - t0
    weights, report = train_predictors(config, data, ks, args.ffn_rank, args.head_rank,
                                       args.steps, args.batch_tokens, args.lr, seed=args.seed,
                                       progress=not args.no_progress)
    provenance = {"data": list(map(str, args.data)) if args.data else None,
                  "builtin_corpus": None if args.data else data_mod.builtin_provenance(
                      "calibration"),
                  "tokens": int(seqs.size), "seq_len": args.seq_len,
                  "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                  "jax_version": jax.__version__, "model_source": lm.source}
    details = {"ffn_rank": args.ffn_rank, "head_rank": args.head_rank,
               "ffn_label_k": ks["ffn_label_k"], "head_label_k": ks["head_label_k"],
               "heldout_mean": report["mean"]}
    state = dejavu_state(config, weights, ks["ffn_k"], ks["head_k"], provenance, details)
    save_state(state, args.out, args.overwrite)
    report.update({"model_source": lm.source, "data": what, "data_seconds": round(t_data, 1),
                   "seconds": round(time.time() - t0, 1), "state": str(args.out)})
    if args.report:
        write_json_atomic(report, args.report)
    r = report["mean"]
    print(f"dejavu: held-out ffn_recall {r['ffn_recall']:.3f} ffn_precision "
          f"{r['ffn_precision']:.3f} head_recall {r['head_recall']:.3f} predicted sparsity "
          f"{r['predicted_sparsity']:.3f} ({report['seconds']:.0f} s); wrote {args.out}"
          + (f", {args.report}" if args.report else ""))
    return 0
