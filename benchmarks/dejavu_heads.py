"""Deja Vu decoding with head sparsity: tokens/s through `Generator.generate_ids` (the path
`jaxsparse generate` runs), masked dense XLA against the kernels, next to dense decoding.

    python benchmarks/dejavu_heads.py --json benchmarks/results/dejavu_heads_h100.json

Rows, per batch size (median of `--repeats` calls after one warm-up call that compiles):
- `dense`: no sparsity state, XLA.
- `dejavu-xla`: a dejavu state, masked dense XLA (every head computed, then masked).
- `dejavu-pallas`: the same state through the kernels: q, attention and o for the
  predicted heads only (`pallas_kernels.head_sparse_attention`), K/V for every head.
- `dejavu-xla-sort` (with `--topk-sort`): dejavu-xla with the predictors' top-k found by
  sorting the scores (`jaxsparse.rules.topk_mask(select="sort")`) instead of the
  default, which counts on a GPU: what the selection costs.
`--profile DIR` adds each row's per-step device time by kernel kind and its top kernels
(`decode.profile_steps`).
The state keeps `head_k = round(H * (1 - --head-sparsity))` heads per token and
`ffn_k = round(m * (1 - --ffn-sparsity))` FFN neurons (default: all, so that the rows show
the head path alone). Its predictors are random (init_predictors): this measures speed,
not quality; which heads they pick does not change the work.

`--model llama3-8b` (default) is a Llama-3-8B-shaped model with random bf16 weights and
byte-level text (benchmarks/decode.py); `smollm2` the real SmolLM2-135M-Instruct (bf16);
`tiny` a small random model that runs on a CPU in seconds (`--impl reference`), to check
the script itself.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax
import numpy as np

from jaxsparse.config import ModelConfig
from jaxsparse.generate import Generator
from jaxsparse.predictors import dejavu_state, init_predictors
from jaxsparse.registry import kernels_for_method

TINY = ModelConfig(
    model_type="llama",
    vocab_size=300,
    hidden_size=128,
    intermediate_size=256,
    num_layers=2,
    num_heads=8,
    num_kv_heads=2,
    head_dim=16,
    dtype="float32",
)


def load(name: str):
    """(config, params, tokenizer, description)."""
    from decode import LLAMA3_8B, ByteTokenizer, random_params

    if name == "llama3-8b":
        return (
            LLAMA3_8B,
            random_params(LLAMA3_8B),
            ByteTokenizer(),
            "Llama-3-8B shapes, random bf16 weights, byte-level text",
        )
    if name == "tiny":
        return TINY, random_params(TINY), ByteTokenizer(), "tiny random model (script check)"
    from jaxsparse.loading import load_model

    lm = load_model(None if name == "smollm2" else name, dtype="bfloat16")
    return lm.config, lm.params, lm.tokenizer, f"{Path(lm.source).name} (bf16)"


def prompts_for(tokenizer, n: int, length: int) -> list[list[int]]:
    from decode import prompt_batch

    return prompt_batch(tokenizer, n, length)


def dejavu_thresholds(config: ModelConfig, head_k: int, ffn_k: int) -> dict:
    w = {k: np.asarray(v) for k, v in init_predictors(config, 32, 32).items()}
    return dejavu_state(config, w, ffn_k, head_k).thresholds_for_model()


def timed(gen: Generator, prompts, new_tokens: int, thresholds, repeats: int) -> dict:
    def call():
        return gen.generate_ids(prompts, new_tokens, thresholds=thresholds, stop_at_eos=False)

    compile_s = call().compile_s
    results = sorted((call() for _ in range(repeats)), key=lambda r: r.decode_s)
    r = results[len(results) // 2]
    row = {
        "decode_tokens_per_s": r.decode_tokens_per_s,
        "decode_tokens_per_s_per_sequence": r.decode_tokens_per_s / len(prompts),
        "decode_s": r.decode_s,
        "decode_s_all": [x.decode_s for x in results],
        "decode_tokens": r.decode_tokens,
        "compile_s": compile_s,
    }
    if r.measured_sparsity:
        row["measured_o_in_sparsity"] = r.measured_sparsity.get("o_in")
        row["measured_gate_sparsity"] = r.measured_sparsity.get("gate")
    return row


@contextlib.contextmanager
def topk_select(select: str):
    """The model's Deja Vu top-k (`jaxsparse.models.predictor.topk_mask`) with `select`
    while the block runs (a Generator compiles on its first call, inside the block)."""
    from jaxsparse.models import predictor
    from jaxsparse.rules import topk_mask

    predictor.topk_mask = functools.partial(topk_mask, select=select)
    try:
        yield
    finally:
        predictor.topk_mask = topk_mask


def run(args) -> dict:
    config, params, tok, desc = load(args.model)
    params = jax.device_put(params)
    H, m = config.num_heads, config.intermediate_size
    head_k = max(1, round(H * (1 - args.head_sparsity)))
    ffn_k = max(1, round(m * (1 - args.ffn_sparsity)))
    th = dejavu_thresholds(config, head_k, ffn_k)
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = prompts_for(tok, batch, args.prompt_len)
        setups = [
            ("dense", kernels_for_method("dense", "xla"), None),
            ("dejavu-xla", kernels_for_method("dejavu", "xla"), th),
            ("dejavu-pallas", kernels_for_method("dejavu", "pallas", args.impl), th),
        ]
        if args.topk_sort:
            setups.insert(2, ("dejavu-xla-sort", kernels_for_method("dejavu", "xla"), th))
        for name, kernels, thresholds in setups:
            with topk_select("sort" if name.endswith("-sort") else "auto"):
                gen = Generator(config, params, kernels=kernels)
                row = {
                    "setup": name,
                    "batch": batch,
                    "kernels": kernels.mode,
                    **timed(gen, prompts, args.new_tokens, thresholds, args.repeats),
                }
                if args.profile:
                    from decode import profile_steps

                    prof_args = argparse.Namespace(
                        new_tokens=args.new_tokens, profile=args.profile, collect_stats=None
                    )
                    row["profile"] = profile_steps(
                        gen, prompts, thresholds, prof_args, f"{name}_b{batch}"
                    )
            print(json.dumps(row), flush=True)
            rows.append(row)
            del gen
    dense = {r["batch"]: r["decode_tokens_per_s"] for r in rows if r["setup"] == "dense"}
    for r in rows:
        r["speedup_vs_dense"] = r["decode_tokens_per_s"] / dense[r["batch"]]
    return {
        "benchmark": "dejavu_heads",
        "command": "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]),
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "jax_version": jax.__version__,
        "date": datetime.date.today().isoformat(),
        "model": desc,
        "head_k": head_k,
        "num_heads": H,
        "ffn_k": ffn_k,
        "intermediate_size": m,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "impl": args.impl,
        "predictors": "random (speed only)",
        "rows": rows,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True, help="where to write the results")
    p.add_argument("--model", default="llama3-8b", help="llama3-8b, smollm2, tiny, or a path")
    p.add_argument("--head-sparsity", type=float, default=0.5)
    p.add_argument("--ffn-sparsity", type=float, default=0.0)
    p.add_argument("--batches", default="1,4")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--impl",
        default="auto",
        help="kernel impl for dejavu-pallas (auto: gpu on a GPU, else reference)",
    )
    p.add_argument("--profile", help="directory for profiler traces: per-step device time")
    p.add_argument(
        "--topk-sort",
        action="store_true",
        help="add a dejavu-xla row whose predictors' top-k sorts (the selection's cost)",
    )
    args = p.parse_args(argv)
    for name in ("head_sparsity", "ffn_sparsity"):
        v = getattr(args, name)
        if not 0.0 <= v < 1.0:
            p.error(f"--{name.replace('_', '-')} must be in [0, 1), got {v}")
    out = run(args)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    tmp.replace(path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
