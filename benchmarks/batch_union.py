"""How many input channels does a decode batch need, on real text? The union of the active
rows across the rows of a batch, against the independent-rows estimate `1 - S^B` that
`jaxsparse.generate.default_kernels` uses to decide whether the batch kernels run.

    python benchmarks/batch_union.py STATE [STATE ...] [--model smollm2] [--ppl FILE ...]
        [--sequences 16] [--seq-len 256] [--batches 2,4,8] [--samples 64] [--json OUT]

Each state's thresholds are applied to a forward pass over `--sequences` windows of
`--seq-len` tokens of the evaluation text (the built-in `evaluation` split unless `--ppl`;
no state is calibrated on it). Each sparsified point's zero mask is kept per token. A batch
step of B rows is modelled as B tokens at the same position of B different windows (rows
of a decode batch hold different texts); `--samples` such groups per B, at positions from
16 on (past the first tokens, whose activations are atypical). Reported per point, over
every layer: the fraction of channels a single token keeps (`single`), the fraction some
row of the group keeps (`union_bB`), and `1 - (1 - single)^B`, the union if rows were
independent (`independent_bB`), plus the same averaged over the points weighted by the
weights of the projections each point selects rows of (`weighted`: the share of a
block's weights a batch step reads).

Runs on any backend (CPU is fine: one forward pass per state).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

# points of the decode step, with the projections whose rows each one selects
# (`jaxsparse.sparsity.linear_sizes` names; OPT's fc1/fc2 where Llama has gate/up/down)
READS = {
    "q_in": ("q_proj", "k_proj", "v_proj"),  # TEAL's shared q/k/v input
    "kv_in": ("k_proj", "v_proj"),
    "o_in": ("o_proj",),
    "ffn_in": ("gate_proj", "up_proj", "fc1"),
    "down_in": ("down_proj", "fc2"),
}


def draw_groups(batches, sequences: int, seq_len: int, samples: int, seed: int) -> dict:
    """Per batch size B: `samples` groups (B distinct windows, one position from 16 on)."""
    rng = np.random.default_rng(seed)
    return {
        B: [
            (rng.choice(sequences, B, replace=False), int(rng.integers(16, seq_len)))
            for _ in range(samples)
        ]
        for B in batches
    }


def point_union(kept: np.ndarray, groups: dict) -> dict:
    """One point's row of the report from `kept` bool [layers, windows, T, width] (True:
    the channel survives): the fraction one token keeps (positions from 16 on), and per B
    the mean fraction of channels some token of a group keeps, against `1 - (1 -
    single)^B`."""
    row = {"layers": int(kept.shape[0]), "single": float(kept[:, :, 16:].mean())}
    for B, picks in groups.items():
        union = [kept[:, seqs, pos].any(axis=1).mean() for seqs, pos in picks]
        row[f"union_b{B}"] = float(np.mean(union))
        row[f"independent_b{B}"] = 1.0 - (1.0 - row["single"]) ** B
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("states", nargs="+", help="sparsity state directories")
    p.add_argument("--model", default=None, help="as `jaxsparse eval --model` (default: SmolLM2)")
    p.add_argument("--ppl", nargs="*", default=None, help="text files (default: built-in split)")
    p.add_argument("--sequences", type=int, default=16, help="windows (the rows drawn from)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batches", default="2,4,8", help="batch sizes, comma-separated")
    p.add_argument("--samples", type=int, default=64, help="groups per batch size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="where to write the result")
    args = p.parse_args(argv)
    try:
        batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        p.error(f"--batches {args.batches!r}: use integers separated by commas, e.g. 2,4,8")
    if not batches or min(batches) < 2 or max(batches) > args.sequences:
        p.error(
            f"--batches {args.batches!r}: each batch must be in [2, --sequences={args.sequences}]"
        )
    if args.seq_len <= 16 or args.samples < 1:
        p.error("--seq-len must be above 16 and --samples at least 1")
    for path in args.states:
        if not (Path(path) / "state.json").is_file():
            p.error(f"{path} is not a sparsity state directory (no state.json in it)")

    import jax
    import jax.numpy as jnp

    from jaxsparse.evaluate import ppl_token_ids
    from jaxsparse.loading import load_model
    from jaxsparse.measure import TAP_PATHS
    from jaxsparse.models import build_model, positions_from_mask
    from jaxsparse.sparsity import linear_sizes, load_state

    lm = load_model(args.model) if args.model else load_model()
    c = lm.config
    need = args.sequences * args.seq_len
    ids = ppl_token_ids(c, lm.tokenizer, args.ppl, need)
    if len(ids) < need:
        p.error(f"the text has {len(ids)} tokens; --sequences x --seq-len needs {need}")
    tokens = jnp.asarray(ids.reshape(args.sequences, args.seq_len))
    valid = jnp.ones(tokens.shape, bool)
    model = build_model(c)

    @jax.jit
    def zero_masks(params, thresholds):
        _, variables = model.apply(
            {"params": params},
            tokens,
            positions_from_mask(valid),
            thresholds=thresholds,
            mutable=["zeros"],
        )
        return variables["zeros"]

    sizes = linear_sizes(c)
    groups = draw_groups(batches, args.sequences, args.seq_len, args.samples, args.seed)
    results = {}
    for path in args.states:
        state = load_state(path, config=c)
        zeros = jax.device_get(zero_masks(lm.params, state.thresholds_for_model()))
        points = {}
        for point in READS:
            module, name = TAP_PATHS[point]
            layers = [
                ~np.asarray(zeros[f"layers_{i}"][module][name][0])  # [seqs, T, width]: kept
                for i in range(c.num_layers)
                if name in zeros.get(f"layers_{i}", {}).get(module, {})
            ]
            if not layers:
                continue  # not sparsified by this method
            points[point] = point_union(np.stack(layers), groups)
        # kv_in's own mask, where the method has one, selects k/v's rows instead of q_in's
        reads = {pt: READS[pt] for pt in points}
        if "kv_in" in points and "q_in" in points:
            reads["q_in"] = ("q_proj",)
        weight = {pt: sum(sizes.get(w, 0) for w in reads[pt]) for pt in points}
        total = sum(weight.values())
        weighted = (
            {
                key: sum(points[pt][key] * weight[pt] for pt in points) / total
                for key in next(iter(points.values()))
                if key != "layers"
            }
            if points
            else {}
        )
        results[str(path)] = {
            "method": state.method,
            "target_sparsity": state.target_sparsity,
            "points": points,
            "weighted": weighted,
        }
        line = (
            "  ".join(
                f"b{B} {weighted[f'union_b{B}']:.3f} (indep. {weighted[f'independent_b{B}']:.3f})"
                for B in batches
            )
            if weighted
            else "nothing sparsified"
        )
        print(
            f"{path}: {state.method} S={state.target_sparsity}: single "
            f"{weighted.get('single', 1.0):.3f}  {line}"
        )
    out = {
        "benchmark": "batch_union",
        "model": str(lm.source),
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "sequences": args.sequences,
        "seq_len": args.seq_len,
        "samples": args.samples,
        "states": results,
        "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
    }
    if args.json:
        from jaxsparse.io import write_json_atomic

        write_json_atomic(out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
