"""Is one sparsity state's perplexity really below another's? A paired bootstrap on the
same evaluation text.

    python benchmarks/paired_ppl.py STATE_A STATE_B [--model smollm2] [--ppl FILE ...]
        [--max-tokens N] [--seq-len 512] [--block 64] [--resamples 10000] [--json OUT]
    python benchmarks/paired_ppl.py RESULT_A.json RESULT_B.json [--json OUT]

Two states are scored on the same windows (`jaxsparse eval`'s: non-overlapping windows
of `--seq-len` over the evaluation text; the built-in `evaluation` split unless `--ppl`),
by default the whole text: `jaxsparse eval` stops at 8192 tokens, and at 50% sparsity on
SmolLM2 two states whose thresholds differ by 2e-6 (relative) give perplexities 1.2%
apart there (benchmarks/results/smollm2_cpu_wina/paired/). The per-token negative
log-likelihoods of A and B are paired; their difference is resampled two ways: whole
windows (independent text, few units) and blocks of `--block` consecutive tokens (more
units; neighbouring blocks are not independent, so this interval is the narrower,
optimistic one). Printed and written: each state's perplexity (as `jaxsparse eval`
reports it), the difference B - A, and 95% intervals of that difference from each
resampling.

Two result JSONs of `jaxsparse eval` or `sweep` made on the same text are compared
without the model, at the window level only (their `window_nll`;
`jaxsparse.evaluate.paired_difference`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np


def per_token_nll(ev, state, token_ids: np.ndarray) -> list[np.ndarray]:
    """-log p of every next token, per window, as `Evaluator.perplexity` sums them."""
    from jaxsparse.evaluate import SparsityMeter

    meter = SparsityMeter(ev.config.num_layers)
    lls = ev.window_log_likelihoods(token_ids, ev._thresholds(state), meter)
    return [-x.astype(np.float64) for x in lls]


def ppl_of(nll: np.ndarray) -> float:
    return math.exp(float(nll.mean()))


def bootstrap(units_a: list[np.ndarray], units_b: list[np.ndarray], resamples: int, seed: int):
    """95% interval of ppl(B) - ppl(A) over resamples of the paired units (with replacement):
    `jaxsparse.evaluate.paired_bootstrap` on the units' sums."""
    from jaxsparse.evaluate import paired_bootstrap

    return paired_bootstrap(
        [u.sum() for u in units_a],
        [u.sum() for u in units_b],
        [len(u) for u in units_a],
        resamples,
        seed,
    )


def compare_results(path_a: str, path_b: str, resamples: int, seed: int) -> dict:
    """Two `jaxsparse eval` / `sweep` result JSONs compared without running the model: a
    window-level interval only (`jaxsparse.evaluate.paired_difference`)."""
    from jaxsparse.evaluate import paired_difference

    a, b = (json.loads(Path(p).read_text()) for p in (path_a, path_b))
    out = paired_difference(a, b, resamples, seed)
    return {
        "result_a": path_a,
        "result_b": path_b,
        "method_a": a.get("method"),
        "method_b": b.get("method"),
        **out,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("state_a", help="a sparsity state directory, or a result JSON (the reference)")
    p.add_argument("state_b", help="a sparsity state directory, or a result JSON (compared with A)")
    p.add_argument("--model", default=None, help="as `jaxsparse eval --model` (default: SmolLM2)")
    p.add_argument("--ppl", nargs="*", default=None, help="perplexity text files")
    p.add_argument("--max-tokens", type=int, default=None, help="default: the whole text")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block", type=int, default=64, help="tokens per block (block resampling)")
    p.add_argument("--resamples", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="where to write the result")
    args = p.parse_args(argv)
    if args.block < 1 or args.resamples < 100:
        p.error("--block must be at least 1 and --resamples at least 100")
    paths = [Path(args.state_a), Path(args.state_b)]
    if all(path.suffix == ".json" and path.is_file() for path in paths):
        try:
            result = compare_results(args.state_a, args.state_b, args.resamples, args.seed)
        except ValueError as e:
            p.error(str(e))
        lo, hi = result["interval95"]
        print(
            f"B - A = {result['ppl_b_minus_a']:+.3f}; 95% interval, windows "
            f"({result['windows']}): [{lo:+.3f}, {hi:+.3f}]"
        )
        _write(args.json, result)
        return 0
    for name, path in zip(("state_a", "state_b"), paths, strict=True):
        if not (path / "state.json").is_file():
            p.error(
                f"{name}: {path} is neither a sparsity state directory (no state.json in it) "
                "nor a result JSON"
            )

    from jaxsparse.evaluate import Evaluator, ppl_token_ids
    from jaxsparse.loading import load_model
    from jaxsparse.sparsity import load_state

    lm = load_model(args.model) if args.model else load_model()
    ids = ppl_token_ids(lm.config, lm.tokenizer, args.ppl, args.max_tokens)
    ev = Evaluator(lm.config, lm.params, lm.tokenizer, args.seq_len, args.batch_size)
    states = [load_state(getattr(args, n), lm.config) for n in ("state_a", "state_b")]
    a, b = (per_token_nll(ev, st, ids) for st in states)
    flat_a, flat_b = np.concatenate(a), np.concatenate(b)

    def blocks(windows):
        return [w[i : i + args.block] for w in windows for i in range(0, len(w), args.block)]

    win = bootstrap(a, b, args.resamples, args.seed)
    blk = bootstrap(blocks(a), blocks(b), args.resamples, args.seed)
    result = {
        "state_a": str(args.state_a),
        "state_b": str(args.state_b),
        "method_a": states[0].method,
        "method_b": states[1].method,
        "tokens": len(flat_a),
        "windows": len(a),
        "ppl_a": ppl_of(flat_a),
        "ppl_b": ppl_of(flat_b),
        "ppl_b_minus_a": ppl_of(flat_b) - ppl_of(flat_a),
        "tokens_b_better": float((flat_b < flat_a).mean()),
        # the tokens that move the mean most: (position in the text, nll A, nll B)
        "largest_token_differences": [
            (int(i), float(flat_a[i]), float(flat_b[i]))
            for i in np.argsort(-np.abs(flat_b - flat_a))[:10]
        ],
        "share_of_difference_in_top10_tokens": float(
            np.sort(np.abs(flat_b - flat_a))[-10:].sum() / max(abs((flat_b - flat_a).sum()), 1e-12)
        ),
        "interval95_windows": win[:2],
        "p_b_below_a_windows": win[2],
        "block_tokens": args.block,
        "interval95_blocks": blk[:2],
        "p_b_below_a_blocks": blk[2],
        "resamples": args.resamples,
        "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
    }
    print(
        f"A {result['method_a']}: ppl {result['ppl_a']:.3f}   B {result['method_b']}: ppl {result['ppl_b']:.3f}"
    )
    print(
        f"B - A = {result['ppl_b_minus_a']:+.3f}; 95% interval, windows ({len(a)}): "
        f"[{win[0]:+.3f}, {win[1]:+.3f}]; blocks of {args.block} tokens: [{blk[0]:+.3f}, {blk[1]:+.3f}]"
    )
    _write(args.json, result)
    return 0


def _write(path: str | None, result: dict) -> None:
    """`result` as JSON at `path` (none: nothing), atomically (`jaxsparse.io.write_json_atomic`)."""
    if path:
        from jaxsparse.io import write_json_atomic

        write_json_atomic(result, path)


if __name__ == "__main__":
    raise SystemExit(main())
