"""Several GPUs: data-parallel evaluation throughput and tensor-parallel batch-1 decoding,
on 1 device against 2 (`jaxsparse.sharding`, the same code `--mesh` runs).

    python benchmarks/multi_gpu.py --json benchmarks/results/multi_gpu_h200x2.json
    python benchmarks/multi_gpu.py --tiny --json /tmp/multi_gpu_tiny.json   # CPU check

1. Evaluation throughput (`jaxsparse.evaluate.Evaluator`, dense, perplexity windows of
   `--seq-len` tokens in batches of `--batch-per-device` (`--smollm2-batch-per-device`)
   rows per device): tokens/s on one device (mesh data=1) and on two (data=2, twice the
   rows per batch), `--eval-batches` batches per timed call, for SmolLM2-135M
   (the real weights if the embedded model loads, else its shapes with random weights:
   the record says which) and Llama-3-8B shapes (random bf16). Real text (stdlib
   docstrings, `evaluation` split) through the model's tokenizer, or a byte-level one for
   random models.
2. Tensor-parallel decoding of Llama-3-8B shapes at batch 1 through `Generator` (what
   `jaxsparse generate` runs), dense and teal (a state fitted by
   `jaxsparse.calibrate.calibrate` on the random model and real text, as
   benchmarks/decode.py does): one device against mesh model=2 (each device reads half of
   every weight; the sparse kernels run per device on their slice of rows). Decode
   tokens/s, the 2-device speedup, and teal's ratio over dense on 1 and on 2 devices.

`--profile DIR` adds each decode row's device time per step and kernel kind (NCCL
collectives apart), per device, from profiler traces of the same `Generator` call.
`--replicate-vocab` has no effect now: it swapped in the table that keeps the vocabulary
whole, before jaxsparse/sharding.py made that the default, and is kept so that the
commands recorded with it still run.

Protocol (docs/design.md, "Measuring"): one warm-up call that compiles, then the median of
`--repeats` timed calls. `--tiny` shrinks every model and size so that it runs on a CPU
with 2 fake devices (it sets `--xla_force_host_platform_device_count=2` before jax starts)
in about a minute: a check that the script works, not a measurement. The JSON goes to
`--json`; a short table is printed last.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

if "--tiny" in sys.argv and "force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""
):  # must precede jax's start
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    ).strip()

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax
import numpy as np
from decode import LLAMA3_8B, ByteTokenizer, prompt_batch, random_params

from jaxsparse.config import full_size_shapes
from jaxsparse.io import write_json_atomic
from jaxsparse.sharding import make_mesh

SMOLLM2_135M = full_size_shapes()["smollm2-135m"]

TINY_SMOLLM2 = dataclasses.replace(
    SMOLLM2_135M,
    vocab_size=320,
    hidden_size=48,
    intermediate_size=96,
    num_layers=2,
    num_heads=3,
    num_kv_heads=3,
    head_dim=16,
    dtype="float32",
)
TINY_LLAMA = dataclasses.replace(
    LLAMA3_8B,
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    dtype="float32",
)


def timed(fn, repeats: int) -> tuple[float, float]:
    """(median seconds of `repeats` calls after one warm-up call, the warm-up's seconds)."""
    t0 = time.perf_counter()
    fn()
    warm = time.perf_counter() - t0
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), warm


def eval_text_ids(tokenizer, n: int, eos: int) -> np.ndarray:
    """`n` token ids of the evaluation split (documents + EOS), repeated if it is short."""
    from jaxsparse.data import encode, stdlib_documents

    ids: list[int] = []
    docs = stdlib_documents("evaluation")
    while len(ids) < n:
        for d in docs:
            ids.extend(encode(tokenizer, d.text))
            ids.append(eos)
            if len(ids) >= n:
                break
    return np.asarray(ids[:n], np.int32)


def load_smollm2(args):
    """(config, params, tokenizer, name): the real SmolLM2-135M in bf16 if it loads (not
    with --tiny), else its shapes with random weights."""
    if args.tiny:
        return (
            TINY_SMOLLM2,
            random_params(TINY_SMOLLM2),
            ByteTokenizer(),
            "SmolLM2-135M shapes (tiny), random weights",
        )
    if args.smollm2 != "random":
        try:
            from jaxsparse.loading import load_model

            lm = load_model(None, "bfloat16")
            return lm.config, lm.params, lm.tokenizer, "SmolLM2-135M-Instruct (real, bf16)"
        except (OSError, ValueError) as e:
            if args.smollm2 == "real":
                raise
            print(f"SmolLM2 weights not loadable ({e}); random weights", file=sys.stderr)
    return (
        SMOLLM2_135M,
        random_params(SMOLLM2_135M),
        ByteTokenizer(),
        "SmolLM2-135M shapes, random bf16 weights",
    )


def llama(args):
    config = (
        TINY_LLAMA if args.tiny else dataclasses.replace(LLAMA3_8B, num_layers=args.llama_layers)
    )
    what = "Llama-3-8B shapes" + (
        " (tiny)"
        if args.tiny
        else ("" if args.llama_layers == 32 else f" ({args.llama_layers} layers)")
    )
    return config, random_params(config), ByteTokenizer(), what + ", random weights"


def eval_throughput(config, params, tok, name: str, args, per_device: int) -> list[dict]:
    """Dense perplexity tokens/s through `Evaluator` on 1 and on 2 devices (data parallel),
    `per_device` rows per device in a batch."""
    from jaxsparse.evaluate import Evaluator

    eos = config.eos_token_ids[0] if config.eos_token_ids else tok.eos_token_id
    rows = []
    for n in (1, 2):
        ev = Evaluator(
            config,
            params,
            tok,
            seq_len=args.seq_len,
            batch_size=per_device * n,
            mesh=make_mesh(n, 1, jax.devices()[:n]),
            progress=False,
        )
        ids = eval_text_ids(tok, args.eval_batches * ev.batch_size * args.seq_len, eos)
        res = {}

        def run(ev=ev, ids=ids, res=res):
            res.update(ev.evaluate(None, ids))

        t, warm = timed(run, args.repeats)
        rows.append(
            {
                "part": "eval",
                "model": name,
                "devices": n,
                "mesh": f"data={n}",
                "batch": ev.batch_size,
                "seq_len": args.seq_len,
                "tokens": res["perplexity_tokens"],
                "seconds": t,
                "tokens_per_s": res["perplexity_tokens"] / t,
                "warmup_s": warm,
                "perplexity": res["perplexity"],
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr)
        del ev
    rows[1]["speedup_vs_1"] = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    return rows


def tp_decode(config, params, tok, name: str, args) -> list[dict]:
    """Batch-1 decode tokens/s through `Generator`, dense and teal, 1 device vs model=2."""
    from jaxsparse.calibrate import calibrate
    from jaxsparse.generate import Generator, default_kernels

    t0 = time.perf_counter()
    states = calibrate(
        config,
        params,
        tok,
        ["teal"],
        [args.sparsity],
        None,
        tokens=args.calibration_tokens,
        seq_len=args.calibration_seq_len,
        batch_size=4,
        model_source=name,
        progress=False,
    )
    calibration_s = time.perf_counter() - t0
    th = {"dense": None, "teal": states[("teal", args.sparsity)].thresholds_for_model()}
    prompt = prompt_batch(tok, 1, args.prompt_len)
    rows = []
    for n in (1, 2):
        for method in ("dense", "teal"):
            kernels = default_kernels(method, 1, args.kernels, th[method])
            gen = Generator(
                config,
                params,
                tok,
                kernels=kernels,
                mesh=None if n == 1 else make_mesh(1, 2, jax.devices()[:2]),
            )
            out = {}

            def run(gen=gen, method=method, out=out):
                out["r"] = gen.generate_ids(
                    prompt, args.new_tokens, thresholds=th[method], stop_at_eos=False
                )
                return out["r"]

            run()  # compiles
            results = sorted((run() for _ in range(args.repeats)), key=lambda r: r.decode_s)
            r = results[len(results) // 2]
            profile = None
            if args.profile:  # after the timing, which it would slow
                from decode import profile_steps

                opts = argparse.Namespace(
                    profile=args.profile, new_tokens=args.new_tokens, collect_stats=None
                )
                profile = profile_steps(gen, prompt, th[method], opts, f"{method}_x{n}", n)
            rows.append(
                {
                    "part": "decode",
                    "model": name,
                    "method": method,
                    "devices": n,
                    "mesh": "one device" if n == 1 else "model=2",
                    "batch": 1,
                    "kernels": kernels.mode,
                    "decode_steps": r.decode_steps,
                    "tokens_per_s": r.decode_steps_per_s,
                    "compile_s": r.compile_s,
                    "measured_sparsity": r.measured_sparsity,
                    "calibration_s": calibration_s,
                    **({"profile": profile} if profile else {}),
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr)
            del gen, out
    by = {(r["method"], r["devices"]): r for r in rows}
    for r in rows:
        r["speedup_vs_1"] = r["tokens_per_s"] / by[(r["method"], 1)]["tokens_per_s"]
        r["ratio_vs_dense"] = r["tokens_per_s"] / by[("dense", r["devices"])]["tokens_per_s"]
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True, help="where to write the results")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="tiny models and sizes on a CPU with 2 fake devices (a check)",
    )
    p.add_argument("--parts", default="eval,decode", help="eval, decode or both")
    p.add_argument(
        "--smollm2",
        choices=("auto", "real", "random"),
        default="auto",
        help="SmolLM2 weights: the embedded model if it loads (auto), or random",
    )
    p.add_argument(
        "--llama-layers",
        type=int,
        default=32,
        help="layers of the Llama-3-8B-shaped model (fewer compile faster)",
    )
    p.add_argument("--seq-len", type=int, default=512, help="eval window")
    p.add_argument(
        "--batch-per-device", type=int, default=8, help="eval rows per device, Llama-3-8B shapes"
    )
    p.add_argument(
        "--smollm2-batch-per-device",
        type=int,
        default=32,
        help="eval rows per device, SmolLM2 (a small model needs large batches to "
        "keep a GPU busy between the evaluator's host steps)",
    )
    p.add_argument("--eval-batches", type=int, default=4, help="eval batches per timed call")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--sparsity", type=float, default=0.5, help="teal's target sparsity")
    p.add_argument("--calibration-tokens", type=int, default=2048)
    p.add_argument("--calibration-seq-len", type=int, default=256)
    p.add_argument(
        "--kernels",
        choices=("auto", "pallas", "xla"),
        default="auto",
        help="teal's decode matmuls (auto: the sparse kernels on a GPU at batch 1)",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--replicate-vocab",
        action="store_true",
        help="no effect now: jaxsparse's table keeps the vocabulary (embedding, LM head, "
        "logits) whole (jaxsparse/sharding.py). The flag swapped in that table before it "
        "was the default; it stays so that the commands recorded with it still run",
    )
    p.add_argument(
        "--profile",
        help="directory for profiler traces of the decode part: device time per step and "
        "kernel kind (collectives apart), per device",
    )
    args = p.parse_args(argv)
    if args.tiny:
        args.seq_len, args.batch_per_device, args.eval_batches = 32, 2, 2
        args.smollm2_batch_per_device = 2
        args.prompt_len, args.new_tokens = 16, 8
        args.calibration_tokens, args.calibration_seq_len, args.repeats = 256, 32, 1
    parts = {x.strip() for x in args.parts.split(",") if x.strip()}
    if not parts or parts - {"eval", "decode"}:
        p.error(f"--parts {args.parts}: use eval, decode or eval,decode")
    if len(jax.devices()) < 2:
        p.error(
            f"needs 2 devices, {len(jax.devices())} visible ({jax.devices()[0].platform})"
            "; on a CPU use --tiny"
        )
    t_start = time.perf_counter()
    rows: list[dict] = []
    if "eval" in parts:
        rows += eval_throughput(*load_smollm2(args), args, args.smollm2_batch_per_device)
    if "eval" in parts or "decode" in parts:
        config, params, tok, name = llama(args)
        if "eval" in parts:
            rows += eval_throughput(config, params, tok, name, args, args.batch_per_device)
        if "decode" in parts:
            rows += tp_decode(config, params, tok, name, args)
    out = {
        "benchmark": "multi_gpu",
        "device": jax.devices()[0].device_kind,
        "devices_visible": len(jax.devices()),
        "backend": jax.default_backend(),
        "jax_version": jax.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python benchmarks/multi_gpu.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "tiny": args.tiny,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "settings": {k: v for k, v in vars(args).items() if k not in ("json",)},
        "wall_s": time.perf_counter() - t_start,
        "rows": rows,
    }
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, path)
    print(
        f"\n{out['device']} x{out['devices_visible']}, jax {out['jax_version']}, "
        f"{out['wall_s']:.0f} s{' (--tiny: a check, not a measurement)' if args.tiny else ''}"
        f" -> {path}"
    )
    print(
        f"{'part':6} {'model':44} {'method':6} {'mesh':10} {'tok/s':>10} {'x1 dev':>6} "
        f"{'x dense':>7}"
    )
    for r in rows:
        sp = r.get("speedup_vs_1")
        rd = r.get("ratio_vs_dense")
        print(
            f"{r['part']:6} {r['model'][:44]:44} {r.get('method', 'dense'):6} "
            f"{r['mesh']:10} {r['tokens_per_s']:10.1f} "
            f"{'' if sp is None else f'{sp:.2f}':>6} {'' if rd is None else f'{rd:.2f}':>7}"
        )
    for r in rows:
        if "profile" in r:
            pr = r["profile"]
            kinds = ", ".join(
                f"{k} {v['count_per_step']:.0f}/{v['ms_per_step']:.2f}"
                for k, v in sorted(pr["by_kind"].items())
            )
            print(
                f"profile {r['method']:6} {r['mesh']:10} wall {pr['wall_ms_per_step']:.3f} "
                f"ms/step, device {pr['device_ms_per_step']:.3f} per device; {kinds}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
