"""Reading JAX profiler traces: device-side kernel events, grouped by kind.

    python benchmarks/profile_decode.py --summarize DIR --json OUT   # anywhere, no GPU

Used by benchmarks/decode.py (`--profile DIR`: per-step device time of the product's
`generate_ids` at batch 1) and benchmarks/kernels.py (`--profile DIR`: device time per
kernel call). `--summarize` reads trace directories written by the profile of an earlier
version of this script (DIR/<method>/ with a `wall.json`, as in
benchmarks/results/profile_decode_h100.json) and sums the device-side kernel time per
step by kind (Pallas/Triton kernels, XLA matmuls, other fusions, copies), next to the
step's wall time: their difference is launch gaps and host overhead.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def kind(name: str) -> str:
    n = name.lower()
    if "nccl" in n or "all-reduce" in n or "all_reduce" in n or "allreduce" in n:
        return "collective"
    if "sparse" in n or "gated" in n or "pallas" in n or n.startswith("triton") or "kernel" in n:
        return "pallas"
    if "gemv" in n or "gemm" in n or "dot" in n or "cutlass" in n or "matmul" in n or "cublas" in n:
        return "matmul"
    if "memset" in n or "memcpy" in n or "copy" in n:
        return "copy/fill"
    return "other"


def device_kernel_events(trace_dir: Path) -> list[dict]:
    """The device-side kernel events ("X" events of the GPU streams, not host threads) of
    the first Perfetto trace under `trace_dir`, each with `name` and `dur` (µs)."""
    traces = list(Path(trace_dir).rglob("perfetto_trace.json.gz"))
    if not traces:
        return []
    with gzip.open(traces[0]) as f:
        events = json.loads(f.read())
    events = events["traceEvents"] if isinstance(events, dict) else events
    pnames = {
        e["pid"]: e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    dev = {pid for pid, n in pnames.items() if "/device:" in n.lower() or "gpu" in n.lower()}
    return [e for e in events if e.get("ph") == "X" and e.get("pid") in dev]


def traced(fn, trace_dir) -> tuple:
    """`fn()` run (and waited for) under `jax.profiler.trace`; returns its result and the
    device kernel events of that trace (`device_kernel_events`). The trace goes to a new
    subdirectory of `trace_dir`, so a directory reused across calls never hands back an
    earlier call's trace (benchmarks/attention.py's first GPU run read one trace for
    every config that way)."""
    import tempfile

    import jax

    Path(trace_dir).mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="trace_", dir=trace_dir))
    with jax.profiler.trace(str(run_dir), create_perfetto_trace=True):
        out = jax.block_until_ready(fn())
    return out, device_kernel_events(run_dir)


def summarize(directory: str) -> dict:
    """Device kernel events of each method's Perfetto trace, summed per step by kind."""
    out = {}
    for sub in sorted(Path(directory).iterdir()):
        if not (sub / "wall.json").is_file():
            continue
        wall = json.loads((sub / "wall.json").read_text())
        kernels = device_kernel_events(sub)
        if not kernels:
            continue
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
        }
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--summarize", required=True, help="trace directory to read")
    p.add_argument("--json", help="summary JSON to write (with --summarize)")
    args = p.parse_args(argv)
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
