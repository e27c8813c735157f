"""Decode-step attention: XLA's (the model's `attend`) against the attention kernel.

Usage: python benchmarks/attention.py --json OUT [--batches 1,4,8] [--lengths 256,1024]
       [--no-sweep] [--quick]

What it compares, per batch B and cache length S (Llama-3-8B heads: 32 query heads, 8
kv heads of 128, bf16; `kv_len` = 3/4 of S, the slots a decode step has filled):

- `xla`: `jaxsparse.models.layers.attend` over the whole cache, as an XLA decode step
  runs it (QK and PV GEMMs and the softmax fusions), then the `o_in` threshold as a select
  (`jaxsparse.rules.sparsify`) where `--threshold` (the default) is on: what a sparse
  method's XLA step runs between the attention and o_proj;
- `kernel`: `pallas_kernels.head_sparse_attention` with every head selected (what
  `Kernels(decode_attention=True)` runs), the threshold applied to its output inside the
  kernel, slots past `kv_len` never read; one row per config of `SWEEP` (block_s,
  num_warps, num_stages, num_splits: slot ranges per (row, kv head) run by programs of
  their own and merged), the default config first.

Protocol (as `benchmarks/kernels.py`): every timed function is jit-compiled and warmed
up; one timed call runs `calls` attentions unrolled in one jit, each on its own cache
(over 110 MB in all, more than twice the H200's 50 MB L2, as in a decode step where the
weights stream through L2 between layers; at most 128 calls). Reported: the device time per attention (the kernels'
durations in a `jax.profiler` trace of the same call, / calls) and the wall time per
attention (host clock, median of `repeats`). Random data only. On a CPU the kernel runs
in the GPU interpreter and only `--quick` shapes are practical (a check that the script
runs, not a measurement).
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernels import device_us_per_call, time_per_call

from jaxsparse import rules
from jaxsparse.io import write_json_atomic
from jaxsparse.models.layers import attend
from pallas_kernels import head_sparse_attention

H, HKV, DH = 32, 8, 128  # Llama-3-8B
MIN_TOTAL_BYTES = 110e6  # over twice the H200's 50 MB L2
MAX_CALLS = 128  # unrolled attentions per jit (compile time grows with them)
# (block_s, num_warps, num_stages, num_splits); the first is the kernel's default
SWEEP = [
    (64, 4, 2, 1),
    (32, 4, 2, 1),
    (128, 4, 2, 1),
    (64, 8, 2, 1),
    (128, 8, 2, 1),
    (256, 8, 2, 1),
    (64, 4, 2, 2),
    (64, 4, 2, 4),
    (32, 4, 2, 4),
    (64, 4, 2, 8),
    (32, 4, 2, 8),
    (64, 4, 2, 16),
]


def caches(key, B, S, n_buf, dtype):
    """`n_buf` (q, k, v) triples: q [B, 1, H, Dh], k/v [B, Hkv, S, Dh], random normal."""
    out = []
    for k in jax.random.split(key, n_buf):
        kq, kk, kv = jax.random.split(k, 3)
        out.append(
            (
                jax.random.normal(kq, (B, 1, H, DH), jnp.float32).astype(dtype),
                jax.random.normal(kk, (B, HKV, S, DH), jnp.float32).astype(dtype),
                jax.random.normal(kv, (B, HKV, S, DH), jnp.float32).astype(dtype),
            )
        )
    return out


def xla_attention(threshold):
    def f(q, k, v, valid, kv_len):
        S = valid.shape[1]
        mask = (valid & (jnp.arange(S) < kv_len)[None])[:, None]  # [B, 1, S]
        o = attend(q, k, v, mask, DH**-0.5)
        return rules.sparsify(o, threshold) if threshold is not None else o

    return f


def kernel_attention(threshold, impl, block_s, num_warps, num_stages, num_splits):
    opts = {"num_warps": num_warps, "num_stages": num_stages, "num_splits": num_splits}

    def f(q, k, v, valid, kv_len):
        B = q.shape[0]
        o = head_sparse_attention(
            q[:, 0],
            jnp.ones((B, H), jnp.int32),
            k,
            v,
            valid,
            kv_len=kv_len,
            scale=DH**-0.5,
            impl=impl,
            block_s=block_s,
            threshold=threshold,
            **opts,
        )
        return o.reshape(B, 1, H * DH)

    return f


def unrolled(f, calls, n_buf):
    def run(bufs, valid, kv_len):
        return tuple(f(*bufs[i % n_buf], valid, kv_len) for i in range(calls))

    return jax.jit(run)


def bench(args, B, S, dtype, trace_dir) -> list[dict]:
    one = 2 * B * HKV * S * DH * dtype.itemsize
    n_buf = max(args.calls_min, min(MAX_CALLS, math.ceil(args.min_total_bytes / one)))
    calls = n_buf
    bufs = caches(jax.random.key(B * 100003 + S), B, S, n_buf, dtype)
    valid = jnp.ones((B, S), bool)
    kv_len = jnp.int32(max(1, 3 * S // 4))
    # a threshold per channel that zeroes about half of a random attention's output
    t = None
    if args.threshold:
        t = jnp.full((H * DH,), 0.5 / math.sqrt(3 * S // 4), jnp.float32)
    setups = [("xla", None, xla_attention(t))]
    for cfg in SWEEP[: 1 if not args.sweep else None]:
        setups.append(("kernel", cfg, kernel_attention(t, args.impl, *cfg)))
    rows = []
    ref = None
    for name, cfg, f in setups:
        if time.time() > args.deadline:
            print(f"B={B} S={S} {name} {cfg}: skipped (--budget-s)", flush=True)
            continue
        fn = unrolled(f, calls, n_buf)
        try:
            outs = jax.block_until_ready(fn(bufs, valid, kv_len))
        except Exception as e:  # noqa: BLE001 - a config the lowering refuses is recorded
            rows.append({"setup": name, "config": cfg, "error": f"{type(e).__name__}: {e}"[:300]})
            print(f"B={B} S={S} {name} {cfg}: {rows[-1]['error']}", flush=True)
            continue
        got = outs[0].astype(jnp.float32)
        if ref is None:
            ref = got
        # over the entries both keep (an entry at the threshold may fall either side:
        # XLA rounds the probabilities to bf16 before PV, the kernel keeps float32)
        both = (got != 0) & (ref != 0)
        err = float(jnp.max(jnp.where(both, jnp.abs(got - ref), 0)) / jnp.max(jnp.abs(ref)))
        wall, spread = time_per_call(fn, (bufs, valid, kv_len), calls, args.repeats)
        dev_us = device_us_per_call(fn, (bufs, valid, kv_len), calls, Path(trace_dir) / "t")
        zeroed = float(jnp.mean(got == 0))
        row = {
            "setup": name,
            "config": None
            if cfg is None
            else dict(zip(("block_s", "num_warps", "num_stages", "num_splits"), cfg)),
            "batch": B,
            "cache_len": S,
            "kv_len": int(kv_len),
            "calls": calls,
            "wall_us": wall * 1e6,
            "wall_spread": spread,
            "device_us": dev_us,
            "max_rel_diff_vs_xla": err,  # on entries both keep, / max |xla|
            "zeroed_fraction": zeroed,
        }
        rows.append(row)
        dev = "-" if dev_us is None else f"{dev_us:.2f}"
        print(
            f"B={B} S={S} {name:6} {cfg!s:14} device {dev:>7} us  wall {wall * 1e6:7.2f} us  "
            f"diff {err:.1e}  zeroed {zeroed:.2f}",
            flush=True,
        )
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True, help="where to write the results")
    p.add_argument("--batches", default="1,4,8")
    p.add_argument("--lengths", default="256,1024,4096", help="cache lengths S")
    p.add_argument("--no-sweep", dest="sweep", action="store_false", help="default config only")
    p.add_argument(
        "--no-threshold",
        dest="threshold",
        action="store_false",
        help="no o_in threshold (dense attention on both sides)",
    )
    p.add_argument("--impl", default="auto", help="the kernel's impl (default: by backend)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the script runs")
    p.add_argument(
        "--budget-s",
        type=float,
        default=float("inf"),
        help="skip the remaining setups after this many seconds (the JSON is still written)",
    )
    args = p.parse_args(argv)
    args.deadline = time.time() + args.budget_s
    args.batches = [int(b) for b in args.batches.split(",") if b]
    args.lengths = [int(s) for s in args.lengths.split(",") if s]
    args.calls_min, args.min_total_bytes = 16, MIN_TOTAL_BYTES
    if args.quick:
        args.calls_min, args.min_total_bytes, args.repeats = 2, 0, 1
    dtype = jnp.dtype(jnp.bfloat16)
    rows: list[dict] = []
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as trace_dir:
        for B in args.batches:
            for S in args.lengths:
                rows += bench(args, B, S, dtype, trace_dir)
                write_json_atomic(result(args, argv, rows), path)  # what is done so far
    out = result(args, argv, rows)
    print(f"\n{out['device']}, jax {out['jax_version']}: device µs per attention (wall µs)")
    for B in args.batches:
        for S in args.lengths:
            rs = [r for r in rows if r["batch"] == B and r["cache_len"] == S and "error" not in r]
            xla = next((r for r in rs if r["setup"] == "xla"), None)
            ker = [r for r in rs if r["setup"] == "kernel"]
            if not (xla and ker):
                continue
            key = "device_us" if xla["device_us"] is not None else "wall_us"
            best = min(ker, key=lambda r: r[key])
            print(
                f"B={B:<2} S={S:<5} xla {xla[key]:8.2f}  kernel default {ker[0][key]:8.2f}  "
                f"best {best[key]:8.2f} {tuple(best['config'].values())}  "
                f"xla/best {xla[key] / best[key]:.2f}x"
            )
    return 0


def result(args, argv, rows: list[dict]) -> dict:
    return {
        "benchmark": "attention",
        "device": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "jax_version": jax.__version__,
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/attention.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "heads": {"H": H, "Hkv": HKV, "Dh": DH},
        "dtype": "bfloat16",
        "threshold": args.threshold,
        "timing": (
            "device_us: the kernels' durations in a jax.profiler trace of one jitted call of "
            "`calls` attentions, each on its own cache (over 110 MB in all, or 128 calls), "
            "/ calls; wall_us: "
            f"host clock / calls, median of {args.repeats} after a warm-up"
        ),
        "rows": rows,
    }


if __name__ == "__main__":
    sys.exit(main())
