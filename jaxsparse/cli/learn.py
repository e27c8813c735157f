"""`jaxsparse learn`: learn chess or teal thresholds with optax, resumable from checkpoints
(the work is in `jaxsparse.learn`)."""

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
    sparsity,
)
from jaxsparse.learn import DEFAULTS, POINTS, LearnError, LearnSettings, learn
from jaxsparse.training import CKPT_META


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument(
        "--method",
        required=True,
        choices=sorted(POINTS),
        help="chess: per-channel FFN thresholds; teal: the inputs of every linear layer",
    )
    parser.add_argument(
        "--sparsity",
        required=True,
        type=sparsity,
        help="target fraction of activations to zero, in [0, 1)",
    )
    parser.add_argument(
        "--data",
        nargs="+",
        metavar="FILE",
        help="training text (default: the calibration split of the built-in corpus)",
    )
    parser.add_argument(
        "--init",
        metavar="DIR",
        help="calibrated state to start from (default: calibrate --method on the same data)",
    )
    parser.add_argument("--out", required=True, help="directory for the learned state")
    parser.add_argument("--checkpoint-dir", help="training checkpoints (default: <out>.ckpt)")
    parser.add_argument(
        "--steps", type=at_least(1), default=DEFAULTS["steps"], help="optimizer steps"
    )
    parser.add_argument(
        "--lr",
        type=in_interval(0.0, float("inf"), lo_open=True),
        default=DEFAULTS["lr"],
        help="Adam learning rate (on log thresholds)",
    )
    parser.add_argument(
        "--penalty",
        type=at_least(0.0, float),
        default=DEFAULTS["penalty"],
        help="lambda of the sparsity penalty lambda * (s - S)^2",
    )
    parser.add_argument(
        "--tau-start",
        type=in_interval(0.0, float("inf"), lo_open=True),
        default=DEFAULTS["tau_start"],
        help="temperature of the relaxed mask at the first step",
    )
    parser.add_argument(
        "--tau-end",
        type=in_interval(0.0, float("inf"), lo_open=True),
        default=DEFAULTS["tau_end"],
        help="temperature of the relaxed mask at the last step",
    )
    parser.add_argument(
        "--tokens", type=at_least(1), default=DEFAULTS["tokens"], help="training tokens"
    )
    parser.add_argument(
        "--seq-len",
        type=at_least(2),
        help="default 512 (chess), 128 (teal: whole blocks on sequences)",
    )
    parser.add_argument(
        "--batch-tokens",
        type=at_least(1),
        default=DEFAULTS["batch_tokens"],
        help="tokens per optimizer step",
    )
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="batch order seed")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest checkpoint in --checkpoint-dir",
    )
    parser.add_argument(
        "--save-every",
        type=at_least(0),
        default=DEFAULTS["save_every"],
        help="steps between checkpoints (0: none)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    import jax

    from jaxsparse import data as data_mod
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
    ckpt_dir = Path(args.checkpoint_dir or f"{Path(args.out)}.ckpt")
    if args.resume and not (ckpt_dir / CKPT_META).exists():
        raise LearnError(
            f"--resume: {ckpt_dir} holds no learn checkpoint ({CKPT_META} "
            f"missing); run without --resume"
        )
    seq_len = args.seq_len or (
        DEFAULTS["seq_len"] if args.method == "chess" else DEFAULTS["teal_seq_len"]
    )
    t0 = time.time()
    lm = load_model_for(args, needs_tokenizer="learning")
    config = lm.config
    what = data_mod.describe_sources(args.data, "calibration")
    docs = data_mod.load_documents(args.data, "calibration")
    eos = data_mod.eos_token_id(config, lm.tokenizer)
    seqs = data_mod.pack_tokens(docs, lm.tokenizer, eos, seq_len, args.tokens, what)
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
    provenance = {
        "data": list(map(str, args.data)) if args.data else None,
        "builtin_corpus": None if args.data else data_mod.builtin_provenance("calibration"),
        "tokens": int(seqs.size),
        "seq_len": seq_len,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "jax_version": jax.__version__,
        "model_source": lm.source,
    }
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
