"""Per-kernel profile of decode steps (batch 1), per method, from JAX's own profiler.

    python benchmarks/profile_decode.py --out DIR [--sparsity 0.5] [--methods dense,chess]
    python benchmarks/profile_decode.py --summarize DIR --json OUT   # anywhere, no GPU

On the GPU it builds the Llama-3-8B-shaped model of `benchmarks/decode.py`, compiles and
warms up a jitted block of `--steps` decode steps per method, then records one block under
`jax.profiler.trace(..., create_perfetto_trace=True)`; the Perfetto JSON traces land in
DIR/<method>/. `--summarize` reads them and sums the device-side kernel time per step by
kind (Pallas/Triton kernels, XLA matmuls, other fusions, copies), next to the step's wall
time: their difference is launch gaps and host overhead.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def record(args) -> None:
    import decode as bench  # benchmarks/decode.py
    import jax
    import jax.numpy as jnp

    from jaxsparse.models import init_cache, prepare_params
    from jaxsparse.registry import kernels_for_method

    config = bench.LLAMA3_8B
    params = bench.random_params(config)
    prompt = bench.real_text_tokens(None, config.vocab_size, args.prompt_len)
    quantiles = bench.calibrate_thresholds(config, params, prompt, args.sparsity)
    for method in args.methods:
        th = bench.thresholds_for(method, quantiles, config)
        kernels = kernels_for_method(method, "pallas" if method != "dense" else "xla")
        p = prepare_params(params, config, kernels)
        step = bench.make_decode(config, kernels, args.steps)
        cache = init_cache(config, 1, args.prompt_len + 16 * args.steps)
        tok = jnp.zeros((1,), jnp.int32)
        pos = jnp.full((1,), args.prompt_len, jnp.int32)
        idx = args.prompt_len
        walls = []
        for i in range(6):
            t0 = time.perf_counter()
            tok, pos, cache = step(p, tok, pos, cache, idx, th)
            jax.block_until_ready(tok)
            if i >= 2:
                walls.append((time.perf_counter() - t0) / args.steps)
            idx += args.steps
        out = Path(args.out) / method.replace("+", "_plus")
        with jax.profiler.trace(str(out), create_perfetto_trace=True):
            tok, pos, cache = step(p, tok, pos, cache, idx, th)
            jax.block_until_ready(tok)
        (out / "wall.json").write_text(
            json.dumps(
                {
                    "method": method,
                    "wall_ms_per_step": statistics.median(walls) * 1e3,
                    "steps": args.steps,
                    "device": jax.devices()[0].device_kind,
                    "jax_version": jax.__version__,
                }
            )
        )
        print(f"{method}: {statistics.median(walls) * 1e3:.3f} ms/step", flush=True)
        del p, cache


def kind(name: str) -> str:
    n = name.lower()
    if "sparse" in n or "gated" in n or "pallas" in n or n.startswith("triton") or "kernel" in n:
        return "pallas"
    if "gemv" in n or "gemm" in n or "dot" in n or "cutlass" in n or "matmul" in n or "cublas" in n:
        return "matmul"
    if "memset" in n or "memcpy" in n or "copy" in n:
        return "copy/fill"
    return "other"


def summarize(directory: str) -> dict:
    """Device kernel events of each method's Perfetto trace, summed per step by kind."""
    out = {}
    for sub in sorted(Path(directory).iterdir()):
        if not (sub / "wall.json").is_file():
            continue
        wall = json.loads((sub / "wall.json").read_text())
        traces = list(sub.rglob("perfetto_trace.json.gz"))
        if not traces:
            continue
        with gzip.open(traces[0]) as f:
            events = json.loads(f.read())
        events = events["traceEvents"] if isinstance(events, dict) else events
        # Device streams: processes whose name mentions the GPU (not the host threads).
        pnames = {
            e["pid"]: e["args"]["name"]
            for e in events
            if e.get("ph") == "M" and e.get("name") == "process_name"
        }
        dev = {pid for pid, n in pnames.items() if "/device:" in n.lower() or "gpu" in n.lower()}
        kernels = [e for e in events if e.get("ph") == "X" and e.get("pid") in dev]
        steps = wall["steps"]
        groups: dict[str, dict] = {}
        per_name: dict[str, float] = {}
        for e in kernels:
            g = groups.setdefault(kind(e["name"]), {"count": 0, "ms": 0.0})
            g["count"] += 1
            g["ms"] += e.get("dur", 0.0) / 1e3
            per_name[e["name"][:60]] = per_name.get(e["name"][:60], 0.0) + e.get("dur", 0) / 1e3
        for g in groups.values():
            g["count"] /= steps
            g["ms"] /= steps
        out[wall["method"]] = {
            "wall_ms_per_step": wall["wall_ms_per_step"],
            "kernel_ms_per_step": sum(g["ms"] for g in groups.values()),
            "kernels_per_step": len(kernels) / steps,
            "groups": groups,
            "top_kernels_ms_per_step": {
                k: v / steps for k, v in sorted(per_name.items(), key=lambda kv: -kv[1])[:10]
            },
            "device": wall["device"],
            "jax_version": wall["jax_version"],
            "processes": sorted(pnames[p] for p in dev),
        }
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="trace directory to write (GPU)")
    p.add_argument("--summarize", help="trace directory to read")
    p.add_argument("--json", help="summary JSON to write (with --summarize)")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--methods", default="dense,chess,chess+,teal")
    args = p.parse_args(argv)
    args.methods = args.methods.split(",")
    if args.out:
        record(args)
        return 0
    s = summarize(args.summarize)
    if args.json:
        Path(args.json).write_text(json.dumps(s, indent=2))
    print(f"{'method':8} {'wall ms':>8} {'kernel ms':>9} {'kernels':>8}  by kind (count, ms)")
    for m, r in s.items():
        g = ", ".join(f"{k} {v['count']:.0f}/{v['ms']:.2f}" for k, v in r["groups"].items())
        print(
            f"{m:8} {r['wall_ms_per_step']:8.2f} {r['kernel_ms_per_step']:9.2f} "
            f"{r['kernels_per_step']:8.0f}  {g}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
