"""Benchmark of the Pallas kernels against dense XLA, Llama-3-8B decode shapes, bf16.

Usage: python benchmarks/kernels.py --json OUT [--quick] [--no-sweep] [--impl gpu]

Protocol (docs/design.md, "Measuring"): every timed function is jit-compiled and warmed up;
one timed call runs `calls` kernel invocations unrolled inside one jit, each on its own
activation and its own weight buffer (>= 16 buffers, > 200 MB in all, so the 50 MB L2
does not hold them; never a shared buffer, since XLA's dot merger would fuse dots that
share an operand into one), and the time per invocation is wall / calls, the
median over `repeats` (host clock around `jax.block_until_ready`). Unrolling inside
one jit keeps Python dispatch out of the number: XLA issues the calls back to back.
Random data only (normal; zeros only where the sparsity puts them).

Sparsity s: a random set of round(s * rows) weight rows is inactive, the same set for
every batch row (so the bytes needed are exactly (1 - s) of the weight); the activation
is random normal elsewhere. "GB/s" counts the bytes actually needed (active weight rows,
x, y) over the measured time; "roofline" divides that by ROOFLINE_BPS (an assumed
3.0 TB/s for an H100's copy rate); the run also measures its own copy rate.

Holds the benchmark only; results go to benchmarks/results/kernels_<device>.json.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import math
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from jaxsparse.io import write_json_atomic
from pallas_kernels import gated_matvec, sparse_input_matvec

ROOFLINE_BPS = 3.0e12
MIN_TOTAL_BYTES = 220e6
MATVEC_SHAPES = [(4096, 14336), (14336, 4096), (4096, 4096), (4096, 1024)]
SPARSITIES = [0.0, 0.25, 0.5, 0.7, 0.9]
BATCHES = [1, 4, 8]
FFN_M, FFN_D = 14336, 4096

# (block_k, block_n, split_k, num_warps, num_stages); split_k None = automatic.
SPLIT_MAX = 1 << 20  # split_k clamps to the number of K blocks: one tile per program (TEAL)
# (block_k, block_n, tiles per program, num_warps[, num_stages]): tiles per program sets
# split_k (K blocks / tiles); a program's tiles are unrolled (`unroll`), so their loads
# overlap. num_stages defaults to 1. The last rows aim at a dense input (CHESS's gate:
# `--sweep-sparsities 0.0`), where bigger tiles and pipelined tiles may pay.
MATVEC_SWEEP = [
    (128, 64, 1, 4),
    (128, 64, 2, 4),
    (128, 64, 4, 4),
    (64, 128, 1, 2),
    (64, 128, 2, 4),
    (64, 128, 4, 4),
    (32, 128, 4, 4),
    (64, 64, 4, 4),
    (128, 128, 2, 8),
    (64, 256, 2, 8),
    (32, 256, 4, 4),
    (64, 512, 1, 4),
    (64, 512, 1, 8),
    (64, 512, 2, 4, 2),
    (128, 512, 1, 8),
    (32, 512, 1, 4),
    (64, 1024, 1, 8),
    (128, 256, 2, 8, 2),
    # Several tiles per program: fewer split-K atomics (each output column receives one
    # per K split). At 90% every one was slower than one tile per program
    # (results/kernels_sweep90_h200.json): the atomics are not what costs there.
    (64, 512, 4, 4),
    (64, 512, 8, 4),
    (64, 256, 4, 4),
    (64, 256, 8, 4),
    (32, 512, 8, 4),
    (128, 512, 4, 8),
    (64, 1024, 4, 8),
    (64, 512, 16, 4),
]
# Batch >= 2 (at batch 4, 50%): (block_k, block_n, tiles per program, num_warps, dot).
MATVEC_SWEEP_BATCH = [
    (64, 512, 1, 4, True),
    (64, 128, 1, 4, True),
    (128, 64, 1, 4, True),
    (32, 128, 1, 4, True),
    (64, 64, 1, 4, True),
    (128, 128, 1, 8, True),
    (64, 128, 1, 4, False),
    (128, 64, 1, 4, False),
]
# gated_matvec at batch 1, 50%, with the gate's activation and threshold in the kernel
# (the model's call): (block_m, block_d, num_warps, num_stages)
GATED_SWEEP = [
    (16, 256, 4, 3),
    (8, 256, 4, 3),
    (8, 256, 2, 3),
    (16, 128, 4, 3),
    (16, 256, 2, 3),
    (16, 256, 4, 4),
    (8, 128, 2, 3),
    (32, 128, 4, 3),
    (4, 512, 2, 3),
    (32, 256, 4, 3),
    (64, 128, 8, 3),
    (8, 512, 4, 3),
    (16, 512, 4, 3),
    (32, 512, 8, 3),
    (16, 1024, 8, 3),
    (64, 256, 8, 3),
]
DEADLINE = [float("inf")]  # wall-clock time after which remaining rows are skipped


def over_budget():
    return time.time() > DEADLINE[0]


def log(*a):
    print(*a, flush=True)


def time_per_call(fn, args, calls, repeats, warmup=2):
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append((time.perf_counter() - t0) / calls)
    return statistics.median(ts), (max(ts) - min(ts)) / statistics.median(ts)


def device_us_per_call(f, args, calls, trace_dir):
    """Device-side time of one call of `f(*args)` (which makes `calls` calls) from a
    `jax.profiler` trace: the sum of its kernels' durations / calls, in µs. None where the
    trace holds no device events (a CPU run). Launch gaps and the per-execution host
    overhead are left out, as in a CUDA-graph replay (how TEAL's kernel is timed)."""
    from profile_decode import traced

    jax.block_until_ready(f(*args))
    _, ev = traced(lambda: f(*args), trace_dir)
    if not ev:
        return None
    return sum(float(e.get("dur", 0.0)) for e in ev) / calls


def unrolled(f, calls, n_buf):
    """jit of: y_i = f(x_i, W_{i mod n_buf}) for i < calls, all outputs returned."""

    def run(xs, ws):
        return tuple(f(xs[i], *ws[i % n_buf]) for i in range(calls))

    return jax.jit(run)


def measure_copy_bps(repeats):
    a = jax.random.normal(jax.random.key(7), (256 * 1024 * 1024,), jnp.bfloat16)  # 512 MB
    f = jax.jit(lambda a: a * 2)
    t, _ = time_per_call(f, (a,), 1, repeats)
    del a
    return 2 * 512 * 1024 * 1024 / t


def row_sparse_x(key, B, K, s, dtype, shared=True):
    """Random normal [B, K] with round(s*K) entries of each row exactly zero: the same
    columns for every b (`shared`), or each row its own. Returns (x, rows of W in use)."""
    k1, k2 = jax.random.split(key)
    n_off = round(s * K)
    perms = [
        jax.random.permutation(jax.random.fold_in(k1, b if not shared else 0), K) for b in range(B)
    ]
    active = jnp.stack([jnp.ones((K,), bool).at[p[:n_off]].set(False) for p in perms])
    x = jax.random.normal(k2, (B, K), jnp.float32)
    x = jnp.where(x == 0, 1.0, x)  # never a stray zero
    return (x * active).astype(dtype), int(jnp.sum(jnp.any(active, axis=0)))


def weights(key, shape, n_buf, dtype):
    keys = jax.random.split(key, n_buf)
    return [
        (jax.random.normal(k, shape, jnp.float32) / math.sqrt(shape[0])).astype(dtype) for k in keys
    ]


def n_buffers(bytes_one, calls_min):
    """One weight buffer per invocation: XLA merges dots that share an operand (its
    dot-merger pass), so calls that reuse a buffer would time one merged dot."""
    return max(calls_min, math.ceil(MIN_TOTAL_BYTES / bytes_one))


def bench_matvec(args, cfg_for, dtype, calls_min, repeats):
    rows = []
    for K, N in args.shapes:
        wbytes = K * N * dtype.itemsize
        nb = n_buffers(wbytes, calls_min)
        calls = nb
        ws = [(w,) for w in weights(jax.random.key(K * 7 + N), (K, N), nb, dtype)]
        for B in args.batches:
            cfg = cfg_for.get((K, N, B == 1), {})
            dense = unrolled(lambda x, w: jnp.dot(x, w), calls, nb)
            # the models' call: float32 out (the accumulator, no cast pass after the kernel)
            kern = unrolled(
                lambda x, w, cfg=cfg: sparse_input_matvec(
                    x, w, impl=args.impl, out_dtype=jnp.float32, **cfg
                ),
                calls,
                nb,
            )
            kern_bf16 = unrolled(
                lambda x, w, cfg=cfg: sparse_input_matvec(x, w, impl=args.impl, **cfg), calls, nb
            )
            patterns = ["shared"] + (["independent"] if B > 1 else [])
            for s, pattern in [(s, pt) for s in args.sparsities for pt in patterns]:
                if over_budget():
                    log(f"skipped (time budget): matvec {K}x{N} B={B} s={s}")
                    continue
                keys = jax.random.split(jax.random.key(int(s * 1000) + B), calls)
                xs_act = [row_sparse_x(k, B, K, s, dtype, pattern == "shared") for k in keys]
                xs = [x for x, _ in xs_act]
                n_act = xs_act[0][1]
                try:
                    # correctness on this data, against the float32 reference
                    y = kern(xs, ws)[0]
                    yr = xs[0].astype(jnp.float32) @ ws[0][0].astype(jnp.float32)
                    err = float(jnp.linalg.norm(y.astype(jnp.float32) - yr) / jnp.linalg.norm(yr))
                    td, sd = time_per_call(dense, (xs, ws), calls, repeats)
                    tk, sk = time_per_call(kern, (xs, ws), calls, repeats)
                    tb, _ = time_per_call(kern_bf16, (xs, ws), calls, repeats)
                    tag = Path(args.trace_dir) / f"{K}x{N}_b{B}_s{s}_{pattern}"
                    dd = device_us_per_call(dense, (xs, ws), calls, f"{tag}_dense")
                    dk = device_us_per_call(kern, (xs, ws), calls, f"{tag}_kernel")
                except Exception as e:  # noqa: BLE001 - recorded, the rest still runs
                    rows.append(
                        {
                            "kernel": "sparse_input_matvec",
                            "K": K,
                            "N": N,
                            "batch": B,
                            "sparsity": s,
                            "config": cfg,
                            "error": repr(e)[:500],
                        }
                    )
                    log(f"FAILED matvec {K}x{N} B={B} s={s}: {repr(e)[:300]}")
                    continue
                need = n_act * N * dtype.itemsize + B * (K + N) * dtype.itemsize
                dense_bytes = wbytes + B * (K + N) * dtype.itemsize
                row = result_row(
                    "sparse_input_matvec",
                    K,
                    N,
                    B,
                    s,
                    n_act,
                    nb,
                    calls,
                    cfg,
                    (td, sd),
                    (tk, sk),
                    dense_bytes,
                    need,
                    {
                        "rel_err": err,
                        "pattern": pattern,
                        "time_us_kernel_bf16_out": tb * 1e6,
                        "device_us_dense": dd,
                        "device_us_kernel": dk,
                        "device_speedup": None if not (dd and dk) else dd / dk,
                        "device_gbps_kernel": None if not dk else need / (dk * 1e-6) / 1e9,
                        "path": "tensor-core tile" if B > 1 else "per-row multiply + sum",
                    },
                )
                rows.append(row)
                log(fmt_row(row))
        del ws
    return rows


def sweep_matvec(args, dtype, calls_min, repeats):
    """Times each sweep config at each of `--sweep-sparsities` (default 50%; batch 1:
    MATVEC_SWEEP; batch 4, when batches above 1 are benchmarked: MATVEC_SWEEP_BATCH); the
    best at 50% by device time (wall time where there is no device trace) per (K, N,
    batch 1 or not) is used for the rows."""
    best, results = {}, []
    sweeps = [(1, [(*c[:4], None, *c[4:]) for c in MATVEC_SWEEP])]
    if any(b > 1 for b in args.batches):
        sweeps.append((4, MATVEC_SWEEP_BATCH))
    for K, N in args.shapes:
        wbytes = K * N * dtype.itemsize
        nb = n_buffers(wbytes, calls_min)
        calls = nb
        ws = [(w,) for w in weights(jax.random.key(K + N), (K, N), nb, dtype)]
        keys = jax.random.split(jax.random.key(1), calls)
        for (B, configs), sp in itertools.product(sweeps, args.sweep_sparsities):
            xs = [row_sparse_x(k, B, K, sp, dtype)[0] for k in keys]
            for i, (bk, bn, tpp, nw, dot, *stages) in enumerate(configs):
                if over_budget():
                    break
                split = max(1, -(-K // bk) // tpp)
                cfg = {"block_k": bk, "block_n": bn, "split_k": split, "num_warps": nw}
                cfg["num_stages"] = stages[0] if stages else 1
                if dot is not None:
                    cfg["dot"] = dot
                try:
                    f = unrolled(
                        lambda x, w, cfg=cfg: sparse_input_matvec(
                            x, w, impl=args.impl, out_dtype=jnp.float32, **cfg
                        ),
                        calls,
                        nb,
                    )
                    t, _ = time_per_call(f, (xs, ws), calls, repeats)
                    trace = Path(args.trace_dir) / f"sw{K}x{N}_b{B}_s{sp}_{i}"
                    dev = device_us_per_call(f, (xs, ws), calls, trace)
                except Exception as e:  # noqa: BLE001 - a failing config is recorded
                    results.append(
                        {
                            "K": K,
                            "N": N,
                            "batch": B,
                            "sparsity": sp,
                            "config": cfg,
                            "error": repr(e)[:300],
                        }
                    )
                    log(f"sweep {K}x{N} B={B} s={sp} {cfg} FAILED {repr(e)[:200]}")
                    continue
                results.append(
                    {
                        "K": K,
                        "N": N,
                        "batch": B,
                        "sparsity": sp,
                        "config": cfg,
                        "time_us": t * 1e6,
                        "device_us": dev,
                    }
                )
                log(f"sweep {K}x{N} B={B} s={sp} {cfg} wall {t * 1e6:.1f} us, device {dev} us")
                if sp != 0.5:
                    continue  # the rows' configs are the best at 50%
                score = dev if dev is not None else t * 1e6  # device time where there is one
                key = (K, N, B == 1)
                if key not in best or score < best[key][0]:
                    best[key] = (score, cfg)
        del ws
    return {k: v[1] for k, v in best.items()}, results


def bench_ffn(args, dtype, calls_min, repeats):
    """Gated up (g * x Wu^T), and the whole sparse tail (g * x Wu^T) Wd, vs dense XLA."""
    m, d = FFN_M, FFN_D
    wbytes = m * d * dtype.itemsize
    nb = n_buffers(2 * wbytes, calls_min)
    calls = nb
    wu = weights(jax.random.key(11), (m, d), nb, dtype)
    wd = weights(jax.random.key(12), (m, d), nb, dtype)
    rows, sweep = [], []

    def gx(key, B, s):
        g, n_act = row_sparse_x(key, B, m, s, dtype)
        x = jax.random.normal(jax.random.fold_in(key, 1), (B, d), jnp.float32).astype(dtype)
        return (x, g), n_act

    # small sweeps at B=1, s=0.5: the gate's float32 pre-activation, silu and a threshold
    # of 0 in the kernel (silu(0) = 0: the zeros of g stay its zeros), as the model calls it
    keys = jax.random.split(jax.random.key(3), calls)
    xg = [gx(k, 1, 0.5)[0] for k in keys]
    xg = [(x, g.astype(jnp.float32), jnp.zeros((m,), jnp.float32)) for x, g in xg]
    best_g = None
    for bm, bd, nw, ns in GATED_SWEEP if args.sweep else []:
        if over_budget():
            break
        cfg = {"block_m": bm, "block_d": bd, "num_warps": nw, "num_stages": ns}
        try:
            f = unrolled(
                lambda a, w, cfg=cfg: gated_matvec(
                    a[0], a[1], w, activation="silu", threshold=a[2], impl=args.impl, **cfg
                ),
                calls,
                nb,
            )
            wargs = (xg, [(w,) for w in wu])
            t, _ = time_per_call(f, wargs, calls, repeats)
            dev = device_us_per_call(f, wargs, calls, Path(args.trace_dir) / f"swg_{bm}_{bd}_{nw}")
        except Exception as e:  # noqa: BLE001 - recorded, not fatal
            sweep.append({"kernel": "gated_matvec", "config": cfg, "error": repr(e)[:300]})
            continue
        sweep.append(
            {"kernel": "gated_matvec", "config": cfg, "time_us": t * 1e6, "device_us": dev}
        )
        log(f"sweep gated {cfg} wall {t * 1e6:.1f} us, device {dev} us")
        score = dev if dev is not None else t * 1e6
        if best_g is None or score < best_g[0]:
            best_g = (score, cfg)
    gcfg = best_g[1] if best_g else {}
    mv_cfg = args.best_cfg.get((m, d, True), {})

    fns = {
        "gated_matvec": (
            lambda a, w1, w2: a[1] * jnp.dot(a[0], w1.T),
            lambda a, w1, w2: gated_matvec(a[0], a[1], w1, impl=args.impl, **gcfg),
            1,
        ),
        "ffn_unfused": (
            lambda a, w1, w2: jnp.dot(a[1] * jnp.dot(a[0], w1.T), w2),
            lambda a, w1, w2: sparse_input_matvec(
                gated_matvec(a[0], a[1], w1, impl=args.impl, **gcfg), w2, impl=args.impl, **mv_cfg
            ),
            2,
        ),
    }
    wsets = list(zip(wu, wd))
    for name, (fd, fk, n_w) in fns.items():
        for B in args.batches:
            dense = unrolled(fd, calls, nb)
            kern = unrolled(fk, calls, nb)
            for s in args.sparsities:
                if over_budget():
                    log(f"skipped (time budget): {name} B={B} s={s}")
                    continue
                keys = jax.random.split(jax.random.key(int(s * 1000) + 17 * B), calls)
                data = [gx(k, B, s) for k in keys]
                xs = [a for a, _ in data]
                n_act = data[0][1]
                try:
                    y = kern(xs, wsets)[0]
                    yr = dense(xs, wsets)[0]
                    err = float(
                        jnp.linalg.norm(y.astype(jnp.float32) - yr.astype(jnp.float32))
                        / jnp.linalg.norm(yr.astype(jnp.float32))
                    )
                    td, sd = time_per_call(dense, (xs, wsets), calls, repeats)
                    tk, sk = time_per_call(kern, (xs, wsets), calls, repeats)
                except Exception as e:  # noqa: BLE001 - recorded, not fatal
                    rows.append({"kernel": name, "batch": B, "sparsity": s, "error": repr(e)[:500]})
                    log(f"FAILED {name} B={B} s={s}: {repr(e)[:300]}")
                    continue
                io = B * (d + 2 * m) * dtype.itemsize
                need = n_w * n_act * d * dtype.itemsize + io
                dense_bytes = n_w * wbytes + io
                row_cfg = gcfg if name == "gated_matvec" else {"gated": gcfg, "down": mv_cfg}
                row = result_row(
                    name,
                    d,
                    m,
                    B,
                    s,
                    n_act,
                    nb,
                    calls,
                    row_cfg,
                    (td, sd),
                    (tk, sk),
                    dense_bytes,
                    need,
                    {"rel_err_vs_dense_xla": err},
                )
                rows.append(row)
                log(fmt_row(row))
    return rows, sweep


def result_row(
    kernel,
    K,
    N,
    batch,
    sparsity,
    active_rows,
    n_buf,
    calls,
    config,
    dense,
    kern,
    dense_bytes,
    need,
    extra,
):
    """One result row: `dense`/`kern` are (seconds per call, spread); bytes give GB/s."""
    (td, sd), (tk, sk) = dense, kern
    return {
        "kernel": kernel,
        "K": K,
        "N": N,
        "batch": batch,
        "sparsity": sparsity,
        "active_rows": active_rows,
        "n_buffers": n_buf,
        "calls": calls,
        "config": config,
        "time_us_dense": td * 1e6,
        "time_us_kernel": tk * 1e6,
        "speedup": td / tk,
        "spread_dense": sd,
        "spread_kernel": sk,
        "gbps_dense": dense_bytes / td / 1e9,
        "gbps_kernel": need / tk / 1e9,
        "roofline_frac_dense": dense_bytes / td / ROOFLINE_BPS,
        "roofline_frac_kernel": need / tk / ROOFLINE_BPS,
        "ideal_speedup": dense_bytes / need,
        **extra,
    }


def fmt_row(r):
    dev = ""
    if r.get("device_speedup"):
        dev = (
            f"  | device: dense {r['device_us_dense']:6.1f} us kernel {r['device_us_kernel']:6.1f}"
            f" us x{r['device_speedup']:.2f} {r['device_gbps_kernel']:5.0f} GB/s"
        )
    return (
        f"{r['kernel']:<20} {r['K']:>5}x{r['N']:<5} B={r['batch']} s={r['sparsity']:<4} "
        f"{r.get('pattern', ''):<11} wall: dense {r['time_us_dense']:6.1f} kernel "
        f"{r['time_us_kernel']:6.1f} us x{r['speedup']:.2f} (ideal x{r['ideal_speedup']:.2f})" + dev
    )


def profile_matvec(args, dtype, calls_min, out_dir):
    """Device-side time per call from a profiler trace (`jax.profiler`), next to the wall
    time per call, for dense XLA and the kernel (float32 out, and bf16 out with its cast
    pass) at batch 1, 50%: which kernels a call launches and what each costs on the GPU."""
    from profile_decode import traced

    rows = []
    for K, N in args.shapes:
        wbytes = K * N * dtype.itemsize
        nb = n_buffers(wbytes, calls_min)
        ws = [(w,) for w in weights(jax.random.key(K + 3 * N), (K, N), nb, dtype)]
        keys = jax.random.split(jax.random.key(2), nb)
        xs = [row_sparse_x(k, 1, K, 0.5, dtype)[0] for k in keys]
        cfg = args.best_cfg.get((K, N, True), {})
        fns = {
            "dense_xla": lambda x, w: jnp.dot(x, w),
            "kernel_f32_out": lambda x, w, cfg=cfg: sparse_input_matvec(
                x, w, impl=args.impl, out_dtype=jnp.float32, **cfg
            ),
            "kernel_bf16_out": lambda x, w, cfg=cfg: sparse_input_matvec(
                x, w, impl=args.impl, **cfg
            ),
        }
        for name, fn in fns.items():
            f = unrolled(fn, nb, nb)
            wall, _ = time_per_call(f, (xs, ws), nb, 5)
            _, ev = traced(functools.partial(f, xs, ws), Path(out_dir) / f"{K}x{N}_{name}")
            per_name: dict[str, list[float]] = {}
            for e in ev:
                per_name.setdefault(e["name"][:60], []).append(float(e.get("dur", 0.0)))
            row = {
                "K": K,
                "N": N,
                "what": name,
                "calls": nb,
                "wall_us_per_call": wall * 1e6,
                "device_us_per_call": sum(sum(v) for v in per_name.values()) / nb,
                "device_events_per_call": len(ev) / nb,
                "by_kernel_us_per_call": {k: sum(v) / nb for k, v in per_name.items()},
                "by_kernel_count": {k: len(v) for k, v in per_name.items()},
            }
            rows.append(row)
            log(
                f"profile {K}x{N} {name}: wall {row['wall_us_per_call']:.1f} us/call, device "
                f"{row['device_us_per_call']:.1f} us/call in {row['device_events_per_call']:.1f} "
                f"kernels: "
                + ", ".join(f"{k} {v:.1f}" for k, v in row["by_kernel_us_per_call"].items())
            )
        del ws
    return rows


def run_teal(args):
    """benchmarks/teal_gemv.py in a subprocess, before jax takes the GPU's memory."""
    import json
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "teal.json"
        shapes = ",".join(f"{k}x{n}" for k, n in args.shapes)
        sps = ",".join(str(v) for v in args.sparsities)
        cmd = [sys.executable, str(Path(__file__).parent / "teal_gemv.py"), "--json", str(out)]
        cmd += ["--shapes", shapes, "--sparsities", sps]
        log("running: " + " ".join(cmd))
        r = subprocess.run(
            cmd, check=False, text=True, capture_output=True, timeout=args.teal_timeout
        )
        log(r.stdout[-4000:] + r.stderr[-2000:])
        if r.returncode != 0 or not out.is_file():
            return {"error": f"exit {r.returncode}: {r.stderr[-1000:]}"}
        return json.loads(out.read_text())


def side_by_side(rows, teal):
    """(K, N, s) -> ours vs TEAL's (µs per call, batch 1) for the rows both measured."""
    out = []
    teal_rows = {(r["K"], r["N"], r["sparsity"]): r for r in (teal or {}).get("rows", [])}
    for r in rows:
        key = (r.get("K"), r.get("N"), r.get("sparsity"))
        if r.get("kernel") != "sparse_input_matvec" or r.get("batch") != 1 or key not in teal_rows:
            continue
        t = teal_rows[key]
        out.append(
            {
                "K": key[0],
                "N": key[1],
                "sparsity": key[2],
                "ours_device_us": r.get("device_us_kernel"),
                "ours_wall_us": r["time_us_kernel"],
                "teal_graph_us": t["time_us"],
                "teal_graph_kernel_only_us": t["time_us_kernel_only"],
                "teal_speed_over_ours": (r.get("device_us_kernel") or r["time_us_kernel"])
                / t["time_us"],
                "ours_vs_our_dense_xla_device": r.get("device_speedup"),
                "ours_vs_our_dense_xla_wall": r["speedup"],
                "teal_vs_cublas_dense": t["time_us_dense_cublas"] / t["time_us"],
            }
        )
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True, help="where to write the results")
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    p.add_argument("--no-sweep", dest="sweep", action="store_false")
    p.add_argument("--impl", default="auto", help="kernel impl (default: by backend)")
    p.add_argument("--skip-ffn", action="store_true")
    p.add_argument("--shapes", dest="shapes_arg", help="KxN,... (default: the Llama-3-8B shapes)")
    p.add_argument(
        "--sparsities", dest="sparsities_arg", help="comma-separated (default 0,0.25,0.5,0.7,0.9)"
    )
    p.add_argument("--batches", dest="batches_arg", help="comma-separated (default 1,4,8)")
    p.add_argument(
        "--sweep-sparsities",
        default="0.5",
        help="input sparsities the matvec sweep times each config at (comma-separated; the "
        "rows use the best config at 0.5)",
    )
    p.add_argument("--teal", action="store_true", help="also time TEAL's design (teal_gemv.py)")
    p.add_argument("--teal-timeout", type=float, default=240.0)
    p.add_argument("--profile", help="directory for profiler traces of the 50%% calls")
    p.add_argument(
        "--trace-dir",
        default=None,
        help="where the per-row profiler traces go (default: a temporary directory)",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=float("inf"),
        help="skip remaining rows after this many seconds (JSON still written)",
    )
    args = p.parse_args(argv)

    dtype = jnp.dtype(jnp.bfloat16)
    repeats, calls_min = (3, 4) if args.quick else (7, 16)
    DEADLINE[0] = time.time() + args.budget_s
    args.shapes = [(512, 1024), (1024, 256)] if args.quick else MATVEC_SHAPES
    if args.shapes_arg:
        args.shapes = [tuple(int(v) for v in sh.split("x")) for sh in args.shapes_arg.split(",")]
    args.sparsities = [0.0, 0.5, 0.9] if args.quick else SPARSITIES
    if args.sparsities_arg:
        args.sparsities = [float(v) for v in args.sparsities_arg.split(",")]
    args.batches = [int(v) for v in args.batches_arg.split(",")] if args.batches_arg else BATCHES
    args.sweep_sparsities = [float(v) for v in args.sweep_sparsities.split(",") if v]
    if 0.5 not in args.sweep_sparsities:
        args.sweep_sparsities.append(0.5)
    teal = run_teal(args) if args.teal else None
    if args.trace_dir is None:
        import tempfile

        args.trace_dir = tempfile.mkdtemp(prefix="kernels_traces_")
    global FFN_M, FFN_D, MIN_TOTAL_BYTES
    if args.quick:
        FFN_M, FFN_D, MIN_TOTAL_BYTES = 1024, 512, 4e6

    dev = jax.devices()[0]
    log(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    t_start = time.time()
    copy_bps = measure_copy_bps(repeats) if not args.quick else None
    if copy_bps:
        log(f"measured copy rate: {copy_bps / 1e9:.0f} GB/s (read + write)")
    args.best_cfg, sweep_rows = {}, []
    rows, ffn_rows, ffn_sweep, prof_rows = [], [], [], []
    path = Path(args.json)

    def dump():
        out = {
            "device": dev.device_kind,
            "backend": jax.default_backend(),
            "jax_version": jax.__version__,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "dtype": "bfloat16",
            "impl": args.impl,
            "roofline_bps": ROOFLINE_BPS,
            "measured_copy_bps": copy_bps,
            "device_timing": (
                "device_us_*: the kernels' durations in a jax.profiler trace of the same "
                "jitted call, / calls (no launch gaps, no per-execution host overhead: like "
                "the CUDA-graph replay TEAL's kernel is timed with); the split-K output's "
                "zero-fill counts"
            ),
            "timing": (
                f"per invocation = wall/calls, {calls_min}+ invocations unrolled in one jit, "
                f"each on its own activation and its own weight buffer "
                f"(> {MIN_TOTAL_BYTES / 1e6:.0f} MB in all; no buffer shared, so XLA cannot "
                f"merge the dense dots), "
                f"median of {repeats} after 2 warm-ups; host clock + jax.block_until_ready"
            ),
            "sparsity_pattern": (
                "'shared': the same random set of weight rows inactive for every batch row; "
                "'independent': each batch row its own (the union of active rows grows)"
            ),
            "best_matvec_configs": {
                f"{k[0]}x{k[1]} {'batch 1' if k[2] else 'batch > 1'}": v
                for k, v in args.best_cfg.items()
            },
            "sweep": sweep_rows + ffn_sweep,
            "rows": rows + ffn_rows,
            "profile": prof_rows,
            "teal": teal,
            "side_by_side_b1": side_by_side(rows, teal),
            "command": "python benchmarks/kernels.py "
            + " ".join(sys.argv[1:] if argv is None else argv),
            "wall_s": time.time() - t_start,
        }
        write_json_atomic(out, path)
        return out

    if args.sweep:
        args.best_cfg, sweep_rows = sweep_matvec(args, dtype, calls_min, repeats)
        dump()
    if args.profile:
        prof_rows = profile_matvec(args, dtype, calls_min, args.profile)
        dump()
    rows = bench_matvec(args, args.best_cfg, dtype, calls_min, repeats)
    dump()
    if not args.skip_ffn:
        ffn_rows, ffn_sweep = bench_ffn(args, dtype, calls_min, repeats)
    out = dump()
    log("\n=== summary (bf16; speedup = dense XLA time / kernel time) ===")
    for r in rows + ffn_rows:
        log(fmt_row(r) if "error" not in r else f"{r['kernel']} FAILED {r['error'][:150]}")
    for r in out["side_by_side_b1"]:
        log(
            f"side by side {r['K']}x{r['N']} s={r['sparsity']}: ours {r['ours_device_us']} us "
            f"(device), TEAL {r['teal_graph_us']:.1f} us (graph replay, zero-fill included); "
            f"TEAL time / ours x{r['teal_speed_over_ours']:.2f}; ours vs our dense "
            f"(device) {r['ours_vs_our_dense_xla_device']}"
        )
    return out


if __name__ == "__main__":
    main()
