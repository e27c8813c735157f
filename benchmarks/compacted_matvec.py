"""The compacted-row matvec (pallas_kernels/compacted_matvec.py) against the masked-tile
kernel (pallas_kernels/sparse_matvec.py) and dense XLA, batch 1, bf16, GPU.

Usage: python benchmarks/compacted_matvec.py --json OUT [--teal] [--shapes 4096x14336,...]
       [--sparsities 0.5,0.7,0.9] [--configs 64x256x4,...]  (block_k x block_n x warps)

Same protocol as benchmarks/kernels.py: many calls in one jit, each on its own weight
buffer (> 220 MB in all, beyond L2), device time per call from a profiler trace (zero-fill
included). The compacted kernel is timed with its row list made beforehand
(`compacted`), the list's own kernel (`compact_rows`) apart, and the two together as one
call (`compacted_input_matvec`: list, zero-fill, matvec). With `--teal`, TEAL's kernel
(benchmarks/teal_gemv.py, CUDA-graph replay) is timed in the same run.
Prints a table last.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernels import device_us_per_call, n_buffers, row_sparse_x, unrolled, weights

from jaxsparse.io import write_json_atomic
from pallas_kernels import compacted_matvec as cm
from pallas_kernels import sparse_input_matvec


def _dev(f, args, calls, trace_dir):
    """Device µs per call; NaN where the trace has no device kernels (a CPU smoke run)."""
    us = device_us_per_call(f, args, calls, trace_dir)
    return float("nan") if us is None else us


def parse_shapes(text):
    return [tuple(int(v) for v in s.split("x")) for s in text.split(",") if s]


def parse_configs(text):
    out = []
    for s in text.split(","):
        bk, bn, w = (int(v) for v in s.split("x"))
        out.append({"block_k": bk, "block_n": bn, "num_warps": w})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--shapes", default="4096x14336,14336x4096")
    ap.add_argument("--sparsities", default="0.5,0.7,0.9")
    ap.add_argument(
        "--batches", default="1", help="from 2 on, each row its own pattern (the union is listed)"
    )
    ap.add_argument("--configs", default="64x256x4,128x256x4,64x512x4,32x256x4,64x128x4")
    ap.add_argument("--trace-dir", default="/tmp/compacted_traces")
    ap.add_argument("--calls-min", type=int, default=16)
    ap.add_argument("--impl", default="gpu", help="gpu_interpret: a CPU smoke run")
    ap.add_argument("--teal", action="store_true", help="also time TEAL's kernel (teal_gemv.py)")
    ap.add_argument("--teal-timeout", type=float, default=300)
    args = ap.parse_args(argv)
    dtype = jnp.dtype(jnp.bfloat16)
    configs = parse_configs(args.configs)
    teal = {}
    if args.teal:  # before jax takes the GPU's memory
        from kernels import run_teal

        teal = run_teal(
            argparse.Namespace(
                shapes=parse_shapes(args.shapes),
                sparsities=[float(v) for v in args.sparsities.split(",")],
                teal_timeout=args.teal_timeout,
            )
        )
    teal_us = {(r["K"], r["N"], r["sparsity"]): r["time_us"] for r in teal.get("rows", [])}
    rows = []
    for K, N in parse_shapes(args.shapes):
        nb = n_buffers(K * N * dtype.itemsize, args.calls_min)
        ws = weights(jax.random.key(K + N), (K, N), nb, dtype)
        wt = [(w,) for w in ws]
        dense = unrolled(lambda x, w: jnp.dot(x, w), nb, nb)
        masked = unrolled(
            lambda x, w: sparse_input_matvec(x, w, impl=args.impl, out_dtype=jnp.float32), nb, nb
        )
        compact = unrolled(lambda x, w: cm.compact_rows(x, impl=args.impl), nb, nb)
        cases = [
            (B, float(v))
            for B in (int(b) for b in args.batches.split(","))
            for v in args.sparsities.split(",")
        ]
        for B, s in cases:
            keys = jax.random.split(jax.random.key(int(s * 1000)), nb)
            # from batch 2 each row its own random pattern: the list is their union
            xs_act = [row_sparse_x(k, B, K, s, dtype, shared=B == 1) for k in keys]
            xs = [x for x, _ in xs_act]
            n_act = xs_act[0][1]
            need = n_act * N * dtype.itemsize
            lists = [cm.compact_rows(x, impl=args.impl) for x in xs]
            tag = f"{args.trace_dir}/{K}x{N}_b{B}_s{s}"
            base = {
                "K": K,
                "N": N,
                "sparsity": s,
                "batch": B,
                "active_rows": n_act,
                "needed_MB": need / 1e6,
                "device_us_dense": _dev(dense, (xs, wt), nb, f"{tag}_dense"),
                "device_us_masked": _dev(masked, (xs, wt), nb, f"{tag}_masked"),
                "device_us_compact_rows": _dev(compact, (xs, wt), nb, f"{tag}_compact"),
            }
            if (K, N, s) in teal_us:  # TEAL's kernel, CUDA-graph replay, zero-fill included
                base["teal_us"] = teal_us[(K, N, s)]
            yr = xs[0].astype(jnp.float32) @ ws[0].astype(jnp.float32)
            for cfg in configs:
                fn = unrolled(
                    lambda lst, w, cfg=cfg, N=N, B=B: cm.compacted_matvec_into(
                        jnp.zeros(
                            (cm.accumulator_rows(B), cm.accumulator_columns(N, cfg["block_n"])),
                            jnp.float32,
                        ),
                        0,
                        *lst,
                        w,
                        impl=args.impl,
                        **cfg,
                    )[0],
                    nb,
                    nb,
                )
                whole = unrolled(
                    lambda x, w, cfg=cfg: cm.compacted_input_matvec(
                        x, w, impl=args.impl, out_dtype=jnp.float32, **cfg
                    ),
                    nb,
                    nb,
                )
                try:
                    y = fn(lists, wt)[0]
                    err = float(jnp.linalg.norm(y - yr) / jnp.linalg.norm(yr))
                    y2 = whole(xs, wt)[0]
                    err = max(err, float(jnp.linalg.norm(y2 - yr) / jnp.linalg.norm(yr)))
                    us = _dev(fn, (lists, wt), nb, f"{tag}_{cfg}")
                    us_whole = _dev(whole, (xs, wt), nb, f"{tag}_{cfg}_whole")
                except Exception as e:  # noqa: BLE001 - recorded, the rest still runs
                    rows.append({**base, "config": cfg, "error": repr(e)[:400]})
                    print("FAILED", K, N, s, cfg, repr(e)[:300], flush=True)
                    continue
                row = {
                    **base,
                    "config": cfg,
                    "rel_err": err,
                    "device_us_compacted": us,
                    "compacted_TBps_needed": need / (us * 1e-6) / 1e12,
                    "masked_TBps_needed": need / (base["device_us_masked"] * 1e-6) / 1e12,
                    "speedup_vs_dense": base["device_us_dense"] / us,
                    "device_us_standalone": us_whole,
                    "standalone_vs_dense": base["device_us_dense"] / us_whole,
                    "masked_vs_dense": base["device_us_dense"] / base["device_us_masked"],
                }
                rows.append(row)
                print(row, flush=True)
        del ws
    out = {
        "command": "python " + " ".join(sys.argv),
        "date": datetime.date.today().isoformat(),
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
        "rows": rows,
        "teal": teal,
    }
    write_json_atomic(out, args.json)
    print(
        "\n| shape | B | s | config | dense us | masked us | TEAL us | compacted us | list us "
        "| list + compacted us | compacted TB/s | vs dense | standalone vs dense |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            continue
        c = r["config"]
        print(
            f"| {r['K']}x{r['N']} | {r['batch']} | {r['sparsity']} | {c['block_k']}x{c['block_n']}x{c['num_warps']} "
            f"| {r['device_us_dense']:.1f} | {r['device_us_masked']:.1f} | {r.get('teal_us', float('nan')):.1f} "
            f"| {r['device_us_compacted']:.1f} | {r['device_us_compact_rows']:.1f} "
            f"| {r['device_us_standalone']:.1f} | {r['compacted_TBps_needed']:.2f} "
            f"| {r['speedup_vs_dense']:.2f}x | {r['standalone_vs_dense']:.2f}x |"
        )


if __name__ == "__main__":
    main()
