"""Per-kernel profile of one decode step (batch 1), per method, under Nsight Compute.

    python benchmarks/profile_decode.py --json OUT [--model llama3-8b] [--sparsity 0.5]

For each method it starts a child process under `ncu --profile-from-start off --metrics
gpu__time_duration.sum`; the child builds the model as `benchmarks/decode.py` does,
compiles and warms up one decode step, then profiles exactly one step between
cuProfilerStart and cuProfilerStop. The driver groups the kernels (XLA matvec/fusions,
Pallas/Triton kernels, copies and small ops) and writes their summed GPU time beside the
step's wall time from an un-profiled timing in the same child: the difference is launch
gaps and host overhead. ncu serializes kernels, so only the per-kernel times are used.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import io
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def child(args) -> None:
    import decode as bench  # benchmarks/decode.py
    import jax
    import jax.numpy as jnp

    from jaxsparse.models import init_cache, kernels_for_method, prepare_params

    config = bench.LLAMA3_8B
    params = bench.random_params(config)
    prompt = bench.real_text_tokens(None, config.vocab_size, args.prompt_len)
    quantiles, widths = bench.calibrate_thresholds(config, params, prompt, args.sparsity)
    method = args.child
    th = bench.thresholds_for(method, quantiles, widths, config.dtype)
    kernels = kernels_for_method(method, "pallas") if method != "dense" else None
    p = prepare_params(params, config, kernels) if kernels else params
    del params
    step = bench.make_decode(config, kernels or kernels_for_method("dense", "xla"), 1)
    cache = init_cache(config, 1, args.prompt_len + 64)
    tok = jnp.zeros((1,), jnp.int32)
    pos = jnp.full((1,), args.prompt_len, jnp.int32)
    idx = args.prompt_len
    for _ in range(3):  # compile and warm up
        tok, pos, cache = step(p, tok, pos, cache, idx, th)
        jax.block_until_ready(tok)
        idx += 1
    walls = []
    for _ in range(10):
        t0 = time.perf_counter()
        tok, pos, cache = step(p, tok, pos, cache, idx, th)
        jax.block_until_ready(tok)
        walls.append(time.perf_counter() - t0)
        idx += 1
    cuda = ctypes.CDLL("libcuda.so.1")
    cuda.cuProfilerStart()
    tok, pos, cache = step(p, tok, pos, cache, idx, th)
    jax.block_until_ready(tok)
    cuda.cuProfilerStop()
    print(f"WALL_MS {statistics.median(walls) * 1e3:.4f}", flush=True)


def category(name: str) -> str:
    n = name.lower()
    if "sparse_input" in n or "gated" in n or "_kernel" in n and "triton" in n:
        return "pallas"
    if n.startswith("triton") or "pallas" in n:
        return "pallas"
    if "gemv" in n or "gemm" in n or "dot" in n or "cutlass" in n or "matmul" in n:
        return "matmul (XLA/cuBLAS)"
    if "memset" in n or "memcpy" in n or "copy" in n or "broadcast" in n:
        return "copy/fill"
    return "other fusions"


def driver(args) -> dict:
    ncu = shutil.which("ncu") or next(
        (str(p) for p in Path("/opt/nvidia").glob("nsight-compute/*/ncu")), None)
    if ncu is None:
        raise SystemExit("ncu not found")
    out = {"model": "Llama-3-8B shapes, random bf16", "sparsity": args.sparsity, "methods": {}}
    for method in args.methods:
        cmd = [ncu, "--profile-from-start", "off", "--metrics", "gpu__time_duration.sum",
               "--csv", "--print-units", "base", sys.executable, __file__, "--child", method,
               "--sparsity", str(args.sparsity), "--prompt-len", str(args.prompt_len)]
        r = subprocess.run(cmd, check=False, capture_output=True, text=True,
                           cwd=Path(__file__).parent)
        text = r.stdout
        wall = re.search(r"WALL_MS ([0-9.]+)", text)
        rows = [line for line in text.splitlines() if line.startswith('"')]
        kernels = []
        for row in csv.DictReader(io.StringIO("\n".join(rows))):
            if row.get("Metric Name") == "gpu__time_duration.sum":
                kernels.append((row["Kernel Name"], float(row["Metric Value"].replace(",", "")) / 1e3))  # ns->us
        if not kernels:
            out["methods"][method] = {"error": (r.stderr or text)[-3000:]}
            print(f"{method}: no kernels profiled\n{(r.stderr or text)[-1500:]}", file=sys.stderr)
            continue
        groups: dict[str, dict] = {}
        for name, us in kernels:
            g = groups.setdefault(category(name), {"count": 0, "us": 0.0})
            g["count"] += 1
            g["us"] += us
        top: dict[str, float] = {}
        for name, us in kernels:
            top[name[:80]] = top.get(name[:80], 0.0) + us
        out["methods"][method] = {
            "wall_ms_per_step": float(wall.group(1)) if wall else None,
            "kernel_ms_per_step": sum(us for _, us in kernels) / 1e3,
            "kernels_per_step": len(kernels),
            "groups": groups,
            "top_kernels_us": dict(sorted(top.items(), key=lambda kv: -kv[1])[:12]),
        }
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--methods", default="dense,chess,chess+,teal")
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    args.methods = args.methods.split(",")
    out = driver(args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"\n{'method':8} {'wall ms':>8} {'kernel ms':>9} {'kernels':>8}  groups (count, ms)")
    for m, r in out["methods"].items():
        if "error" in r:
            print(f"{m:8} failed")
            continue
        g = ", ".join(f"{k}: {v['count']} / {v['us'] / 1e3:.2f}" for k, v in r["groups"].items())
        print(f"{m:8} {r['wall_ms_per_step'] or float('nan'):8.2f} {r['kernel_ms_per_step']:9.2f} "
              f"{r['kernels_per_step']:8d}  {g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
