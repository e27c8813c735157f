"""`jaxsparse learn-kl`: learn thresholds end to end against the dense model's next-token
distribution under a global activated-params budget (the work is in `jaxsparse.learn_kl`)."""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

from jaxsparse.cli.common import (
    add_model_arguments,
    at_least,
    check_text_files,
    in_interval,
    load_model_for,
)
from jaxsparse.learn_kl import (
    DEFAULT_POINTS,
    DEFAULTS,
    KLSettings,
    LearnError,
    describe,
    learn_kl,
)
from jaxsparse.training import CKPT_META


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
    parser.add_argument(
        "--data",
        nargs="+",
        metavar="FILE",
        help="training text (default: the calibration split of the built-in corpus)",
    )
    parser.add_argument("--out", required=True, help="directory for the learned state")
    parser.add_argument("--checkpoint-dir", help="training checkpoints (default: <out>.ckpt)")
    parser.add_argument("--steps", type=at_least(1), default=DEFAULTS["steps"])
    parser.add_argument(
        "--lr",
        type=in_interval(0.0, float("inf"), lo_open=True),
        default=DEFAULTS["lr"],
        help="Adam learning rate (log thresholds)",
    )
    parser.add_argument(
        "--penalty",
        type=at_least(0.0, float),
        default=DEFAULTS["penalty"],
        help="lambda of lambda * (fraction - target)^2",
    )
    parser.add_argument(
        "--tau-start",
        type=in_interval(0.0, float("inf"), lo_open=True),
        default=DEFAULTS["tau_start"],
    )
    parser.add_argument(
        "--tau-end", type=in_interval(0.0, float("inf"), lo_open=True), default=DEFAULTS["tau_end"]
    )
    parser.add_argument(
        "--tokens", type=at_least(1), default=DEFAULTS["tokens"], help="training tokens"
    )
    parser.add_argument("--seq-len", type=at_least(2), default=DEFAULTS["seq_len"])
    parser.add_argument(
        "--batch-seqs",
        type=at_least(1),
        default=DEFAULTS["batch_seqs"],
        help="sequences per optimizer step",
    )
    parser.add_argument(
        "--measure-tokens",
        type=at_least(1),
        default=DEFAULTS["measure_tokens"],
        help="training tokens the final rescale measures the fraction on",
    )
    parser.add_argument(
        "--fraction-tol", type=in_interval(0.0, 1.0, lo_open=True), default=DEFAULTS["fraction_tol"]
    )
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest checkpoint in --checkpoint-dir",
    )
    parser.add_argument("--save-every", type=at_least(0), default=DEFAULTS["save_every"])
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    import jax

    from jaxsparse import data as data_mod
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
    ckpt_dir = Path(args.checkpoint_dir or f"{Path(args.out)}.ckpt")
    if args.resume and not (ckpt_dir / CKPT_META).exists():
        raise LearnError(
            f"--resume: {ckpt_dir} holds no learn checkpoint ({CKPT_META} "
            f"missing); run without --resume"
        )
    t0 = time.time()
    lm = load_model_for(args, needs_tokenizer="learning")
    config = lm.config
    what = data_mod.describe_sources(args.data, "calibration")
    docs = data_mod.load_documents(args.data, "calibration")
    eos = data_mod.eos_token_id(config, lm.tokenizer)
    seqs = data_mod.pack_tokens(docs, lm.tokenizer, eos, args.seq_len, args.tokens, what)
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
    provenance = {
        "data": list(map(str, args.data)) if args.data else None,
        "builtin_corpus": None if args.data else data_mod.builtin_provenance("calibration"),
        "tokens": int(seqs.size),
        "seq_len": args.seq_len,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "jax_version": jax.__version__,
        "model_source": lm.source,
    }
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
