"""The yardstick for pallas_kernels' GPU matvec: TEAL's sparse GEMV design, in Triton.

    python benchmarks/teal_gemv.py --json OUT [--shapes 4096x14336,14336x4096]
                                   [--sparsities 0.5,0.9] [--calls 16] [--repeats 7]

TEAL (Liu et al. 2024, "Training-Free Activation Sparsity in Large Language Models") ships
a Triton kernel for `y = x W` with W stored [K, N] (input channels as rows), written here
again from its design: a 2-D grid of (N / BLOCK_N) x (K / BLOCK_K) programs, one tile
each; a program loads its x slice (evict-last: every column block reads it), keeps the
rows with abs(x) > threshold, loads only those rows of its W tile (masked load,
evict-first), reduces in float32 and adds its partial sums into a zeroed fp16 output
with atomics. Its autotuner picks among a fixed list of tile shapes per sparsity bin;
here every config of that list is timed and the fastest is reported, per shape and
sparsity.

Timing follows TEAL's own: the calls are captured once in a CUDA graph and replayed, so
no launch overhead is counted. Each call has its own x and y and (as in
benchmarks/kernels.py) its own weight buffer (> 220 MB in all, beyond L2); per call =
replay time / calls, median of `repeats` (CUDA events). Both with the output zero-fill
in the graph (what a decode step runs) and without it. Data: fp16 (TEAL's dtype), random
normal, with round(s * K) random rows of x exactly zero (threshold 0).

Needs torch with CUDA and triton (the GPU machine has both); writes JSON only.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import math
import statistics
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxsparse.io import write_json_atomic

MIN_TOTAL_BYTES = 220e6
# (BLOCK_K, BLOCK_N, num_warps): TEAL's autotune list (its BLOCK_M is our BLOCK_K).
CONFIGS = [
    (64, 128, 2),
    (64, 64, 4),
    (8, 128, 2),
    (16, 256, 4),
    (32, 256, 4),
    (64, 256, 4),
    (128, 16, 4),
    (128, 32, 4),
    (128, 64, 4),
    (128, 128, 4),
    (128, 256, 4),
    (128, 512, 4),
    (64, 512, 4),
    (32, 512, 4),
    (16, 512, 4),
]


@triton.jit
def _gemv_kernel(
    y_ptr, w_ptr, x_ptr, threshold, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr
):
    pn = tl.program_id(0)
    pk = tl.program_id(1)
    cols = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = pk * BLOCK_K + tl.arange(0, BLOCK_K)
    x = tl.load(x_ptr + ks, mask=ks < K, other=0.0, eviction_policy="evict_last")
    keep = tl.abs(x) > threshold
    w = tl.load(
        w_ptr + ks[:, None] * N + cols[None, :],
        mask=keep[:, None],
        other=0.0,
        eviction_policy="evict_first",
    )
    part = tl.sum(w.to(tl.float32) * x.to(tl.float32)[:, None], 0)
    tl.atomic_add(y_ptr + cols, part.to(y_ptr.dtype.element_ty), mask=cols < N)


def launch(y, w, x, cfg):
    """One call of the kernel: y (zeroed, fp16 [N]) += x [K] @ w [K, N] over kept rows."""
    bk, bn, nw = cfg
    K, N = w.shape
    grid = (triton.cdiv(N, bn), triton.cdiv(K, bk))
    _gemv_kernel[grid](y, w, x, 0.0, N, K, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw)


def graph_time(fn, calls, repeats):
    """Seconds per call of `fn()` (which issues `calls` calls), captured in a CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) / 1e3 / calls)
    return statistics.median(ts)


def calls_of(fn, calls, ws, xs, ys, zero):
    """A closure issuing `calls` calls of `fn(y_i, W_(i mod n_buf), x_i)` (zeroing y_i first)."""

    def run():
        for i in range(calls):
            if zero:
                ys[i].zero_()
            fn(ys[i], ws[i % len(ws)], xs[i])

    return run


def random_x(K, s, gen, dev):
    """Random normal fp16 [K] with round(s*K) random entries exactly zero (none by chance)."""
    x = torch.randn(K, device=dev, dtype=torch.float16, generator=gen)
    x = torch.where(x == 0, torch.ones_like(x), x)
    x[torch.randperm(K, device=dev, generator=gen)[: round(s * K)]] = 0
    return x


def bench_shape(K, N, sparsities, calls_min, repeats):
    dev = torch.device("cuda")
    nb = max(calls_min, math.ceil(MIN_TOTAL_BYTES / (K * N * 2)))
    calls = nb
    gen = torch.Generator(device=dev).manual_seed(K + N)
    ws = [
        torch.randn(K, N, device=dev, dtype=torch.float16, generator=gen) / math.sqrt(K)
        for _ in range(nb)
    ]
    ys = [torch.zeros(N, device=dev, dtype=torch.float16) for _ in range(calls)]
    yd = [torch.empty(1, N, device=dev, dtype=torch.float16) for _ in range(calls)]
    rows = []
    for s in sparsities:
        xs = [random_x(K, s, gen, dev) for _ in range(calls)]
        ref = xs[0].float() @ ws[0].float()
        dense = calls_of(
            lambda y, w, x: torch.matmul(x.view(1, -1), w, out=y), calls, ws, xs, yd, False
        )
        t_dense = graph_time(dense, calls, repeats)
        timings = []
        for cfg in CONFIGS:
            try:
                ys[0].zero_()
                launch(ys[0], ws[0], xs[0], cfg)
                torch.cuda.synchronize()
                err = float((ys[0].float() - ref).norm() / ref.norm().clamp_min(1e-30))
                fn = functools.partial(launch, cfg=cfg)
                t_zero = graph_time(calls_of(fn, calls, ws, xs, ys, True), calls, repeats)
                t_kern = graph_time(calls_of(fn, calls, ws, xs, ys, False), calls, repeats)
            except Exception as e:  # noqa: BLE001 - a config that fails is recorded
                timings.append({"config": list(cfg), "error": repr(e)[:300]})
                continue
            timings.append(
                {
                    "config": list(cfg),
                    "us_with_zero": t_zero * 1e6,
                    "us_kernel": t_kern * 1e6,
                    "rel_err": err,
                }
            )
        best = min((t for t in timings if "error" not in t), key=lambda t: t["us_with_zero"])
        n_act = K - round(s * K)
        need = n_act * N * 2 + 2 * (K + N)
        row = {
            "K": K,
            "N": N,
            "batch": 1,
            "sparsity": s,
            "active_rows": n_act,
            "calls": calls,
            "n_buffers": nb,
            "best_config": best["config"],
            "time_us": best["us_with_zero"],
            "time_us_kernel_only": best["us_kernel"],
            "time_us_dense_cublas": t_dense * 1e6,
            "gbps": need / (best["us_with_zero"] * 1e-6) / 1e9,
            "rel_err": best["rel_err"],
            "configs": timings,
        }
        rows.append(row)
        print(
            f"teal {K}x{N} s={s}: {row['time_us']:.1f} us (kernel only "
            f"{row['time_us_kernel_only']:.1f}), cuBLAS dense {row['time_us_dense_cublas']:.1f} "
            f"us, {row['gbps']:.0f} GB/s, cfg {best['config']}",
            flush=True,
        )
    return rows


def bench(shapes, sparsities, calls_min, repeats):
    rows = []
    for K, N in shapes:
        rows += bench_shape(K, N, sparsities, calls_min, repeats)
        torch.cuda.empty_cache()
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True)
    p.add_argument("--shapes", default="4096x14336,14336x4096")
    p.add_argument("--sparsities", default="0.0,0.5,0.9")
    p.add_argument("--calls", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7)
    a = p.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    sparsities = [float(v) for v in a.sparsities.split(",")]
    rows = bench(shapes, sparsities, a.calls, a.repeats)
    out = {
        "what": "TEAL's sparse GEMV design (Triton), CUDA-graph replay",
        "device": torch.cuda.get_device_name(),
        "torch_version": torch.__version__,
        "triton_version": triton.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "dtype": "float16",
        "command": "python benchmarks/teal_gemv.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "rows": rows,
    }
    write_json_atomic(out, Path(a.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
