"""Calibration: fit threshold methods on text and write their sparsity states.

`calibrate(...)` packs the calibration text into sequences, streams them through the
dense model once (twice for chess/chess+, see `jaxsparse.methods.statistics`), and fits
every requested method at every requested sparsity from the same statistics, returning
`{(method, sparsity): SparsityState}`. `jaxsparse calibrate` (this module's CLI) writes one
state directory. Without `--data` it uses the `calibration` split of the built-in corpus
(`jaxsparse.data`), disjoint from the split `jaxsparse eval` uses.
"""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path
from typing import Any

import numpy as np

DEFAULTS = {"tokens": 16384, "seq_len": 512, "batch_size": 8}


def sequence_batches(seqs_NxT: np.ndarray, batch_size: int):
    """(make_iterator, num_batches): [B, T] token/valid batches, the last padded with
    invalid rows (valid = False) to the full batch size so that one compile serves all."""
    n = len(seqs_NxT)
    num = -(-n // batch_size)

    def batches():
        for start in range(0, n, batch_size):
            rows = seqs_NxT[start:start + batch_size]
            valid = np.ones(rows.shape, bool)
            if len(rows) < batch_size:
                pad = batch_size - len(rows)
                rows = np.concatenate([rows, np.zeros((pad, rows.shape[1]), rows.dtype)])
                valid = np.concatenate([valid, np.zeros((pad, rows.shape[1]), bool)])
            yield rows, valid

    return batches, num


def calibrate(
    config,
    params: dict,
    tokenizer,
    methods: list[str],
    sparsities: list[float],
    data: list[str] | None = None,
    tokens: int = DEFAULTS["tokens"],
    seq_len: int = DEFAULTS["seq_len"],
    batch_size: int = DEFAULTS["batch_size"],
    options: dict[str, dict] | None = None,
    mesh=None,
    model_source: str = "",
    progress: bool = True,
    bins=None,
) -> dict[tuple[str, float], Any]:
    """Fits each method at each sparsity; returns `{(method, sparsity): SparsityState}`.

    `options` maps a method name to its options (e.g. `{"teal": {"allocation": "greedy"}}`).
    Raises ValueError for an unknown method or a sparsity outside [0, 1), and
    `jaxsparse.data.DataError` for empty or too-short data.
    """
    import jax

    from jaxsparse import data as data_mod
    from jaxsparse import sharding
    from jaxsparse.methods import check_sparsity, get_method
    from jaxsparse.methods.statistics import (
        LogBins,
        Requirements,
        collect_block_inputs,
        collect_statistics,
    )
    from jaxsparse.sparsity import make_state

    sparsities = [check_sparsity(s) for s in sparsities]
    modules = {m: get_method(m) for m in methods}
    options = options or {}
    if tokens < 1:
        raise ValueError(f"--tokens {tokens}: must be positive")
    req = Requirements()
    for name, mod in modules.items():
        req = req | mod.requirements(options.get(name))
    bins = bins or LogBins()

    what = data_mod.describe_sources(data, "calibration")
    docs = data_mod.load_documents(data, "calibration")
    eos = data_mod.eos_token_id(config, tokenizer)
    seqs = data_mod.pack_tokens(docs, tokenizer, eos, seq_len, tokens, what)

    mesh = mesh or sharding.make_mesh()
    batch_size = sharding.round_batch(batch_size, mesh)
    params = sharding.shard_params(params, config, mesh)
    batches, num_batches = sequence_batches(seqs, batch_size)
    t0 = time.time()
    stats = collect_statistics(
        config, params, batches, req, bins, num_batches,
        put_batch=lambda x: sharding.put_batch(x, mesh), progress=progress)
    context = None
    if req.block_inputs:
        greedy_tokens = int(options.get("teal", {}).get("greedy_tokens", 1024))
        rows = max(1, min(len(seqs), -(-greedy_tokens // seq_len)))
        valid = np.ones((rows, seq_len), bool)
        context = {"config": config, "params": params, "valid": valid, "progress": progress,
                   "block_inputs": collect_block_inputs(config, params, seqs[:rows], valid)}
    provenance = {
        "data": list(map(str, data)) if data else None,
        "builtin_corpus": None if data else data_mod.builtin_provenance("calibration"),
        "tokens": stats.tokens,
        "seq_len": seq_len,
        "sequences": len(seqs),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "jax_version": jax.__version__,
        "model_source": model_source,
        "histogram": {"lo": bins.lo, "hi": bins.hi, "bins": bins.num,
                      "relative_resolution": bins.ratio - 1},
    }
    states = {}
    for name, mod in modules.items():
        for s in sparsities:
            values, details = mod.fit(stats, s, options.get(name), context)
            details = {**details, "options": options.get(name) or {}}
            prov = {**provenance, "statistics_seconds": round(time.time() - t0, 1)}
            states[(name, s)] = make_state(config, name, s, values, prov, details)
    return states


# ------------------------------------------------------------------ CLI


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="checkpoint dir, HF dir or .gguf (default: the embedded "
                             "SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                        help="params dtype (default: float32, or the checkpoint's)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--method", required=True, help="cats, chess, chess+ or teal")
    parser.add_argument("--sparsity", required=True, type=float,
                        help="target fraction of activations to zero, in [0, 1)")
    parser.add_argument("--data", nargs="+", metavar="FILE",
                        help="text files or JSONL files with a 'text' field (default: the "
                             "calibration split of the built-in stdlib-docstring corpus)")
    parser.add_argument("--tokens", type=int, default=DEFAULTS["tokens"])
    parser.add_argument("--seq-len", type=int, default=DEFAULTS["seq_len"])
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    parser.add_argument("--teal-allocation", choices=["uniform", "greedy"], default="uniform")
    parser.add_argument("--teal-greedy-step", type=float, default=0.05,
                        help="greedy: layer sparsity added per step")
    parser.add_argument("--teal-greedy-tokens", type=int, default=1024,
                        help="greedy: calibration tokens the block error is measured on")
    parser.add_argument("--out", required=True, help="directory to write the state to")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--no-progress", action="store_true")


def method_options(args: argparse.Namespace) -> dict[str, dict]:
    return {"teal": {"allocation": args.teal_allocation, "greedy_step": args.teal_greedy_step,
                     "greedy_tokens": args.teal_greedy_tokens}}


def run(args: argparse.Namespace) -> int:
    from jaxsparse.io import refuse_existing
    from jaxsparse.loading import load_model
    from jaxsparse.methods import check_sparsity, get_method
    from jaxsparse.sparsity import save_state

    # Cheap checks first: a bad argument must not cost a model load.
    s = check_sparsity(args.sparsity)
    get_method(args.method)
    refuse_existing(args.out, args.overwrite)
    t0 = time.time()
    lm = load_model(args.model, args.dtype)
    if lm.tokenizer is None:
        raise SystemExit(f"{lm.source}: no tokenizer; calibration needs one to read text")
    states = calibrate(lm.config, lm.params, lm.tokenizer, [args.method], [s], args.data,
                       args.tokens, args.seq_len, args.batch_size, method_options(args),
                       model_source=lm.source, progress=not args.no_progress)
    state = states[(args.method, s)]
    save_state(state, args.out, args.overwrite)
    print(f"{args.method} at sparsity {s}: calibrated on {state.meta.provenance['tokens']} "
          f"tokens in {time.time() - t0:.1f} s; wrote {Path(args.out)}")
    return 0
