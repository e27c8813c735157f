"""A decode block's norm: XLA's fusions against `pallas_kernels.residual_rms_norm`.

Usage: python benchmarks/norms.py --json OUT [--dim 4096] [--calls 64] [--quick]

What one "norm" is here (batch 1, bf16, Llama-3-8B's d = 4096 by default): the residual
add `x + delta[:, col:col + d]` (delta a float32 accumulator 28672 wide, as a decode
block's), RMSNorm and one threshold; each variant is timed twice, without and with
(`zeros`) the zero-fill of three float32 accumulators of 28672 columns (a block's first
norm). Timed as `calls` such norms chained in one jit (each takes the previous one's
residual), each with its own delta. Rows:

- `xla`: the jnp formulas (`residual_rms_norm_reference`), as XLA compiles them;
- `kernel w=W`: the Pallas kernel with W warps per program;
- `copy`: a Pallas kernel that only copies the d-wide row (the floor of a one-program
  Pallas launch on this GPU).

Reported: device µs per norm (the kernels' durations in a `jax.profiler` trace / calls,
launch gaps left out) and wall µs per norm (host clock, median of `--repeats`). On a CPU
(`--quick`) the kernel runs in the GPU interpreter: a check that the script runs, not a
measurement.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernels import device_us_per_call, time_per_call

from jaxsparse.io import write_json_atomic
from pallas_kernels import _dispatch as dsp
from pallas_kernels import residual_rms_norm, residual_rms_norm_reference

WIDTH = 28672  # the accumulator's columns (Llama-3-8B's gate|up)


def _copy_kernel(x_ref, o_ref):
    o_ref[...] = x_ref[...]


def pallas_copy(x, impl):
    return pl.pallas_call(
        _copy_kernel,
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        grid=(1,),
        compiler_params=dsp.triton_compiler_params(4, 1),
        interpret=impl == "gpu_interpret",
        name="copy_row",
    )(x)


def chain(step, calls):
    def run(x, deltas, scale, t):
        kept = []
        for i in range(calls):
            x, k = step(x, deltas[i], scale, t)
            kept.append(k)
        return x, kept

    return jax.jit(run)


def norm_step(fn, zeros):
    z = ((1, WIDTH),) * 3 if zeros else ()

    def step(x, delta, scale, t):
        out = fn(
            x, scale, eps=1e-5, delta=delta, delta_col=4096, thresholds=(t,), normed=False, zeros=z
        )
        return out.residual, (out.kept[0], out.zeros)

    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--json", required=True)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--calls", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warps", default="1,2,4,8,16")
    p.add_argument("--quick", action="store_true", help="small shapes, the interpreter on a CPU")
    args = p.parse_args(argv)
    on_gpu = jax.default_backend() == "gpu"
    impl = "gpu" if on_gpu else "gpu_interpret"
    d, calls = args.dim, args.calls
    if args.quick:
        d, calls, args.repeats = 256, 2, 2
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (1, d)).astype(jnp.bfloat16)
    deltas = [
        jax.random.normal(jax.random.fold_in(k[1], i), (1, WIDTH), jnp.float32)
        for i in range(calls)
    ]
    scale = (1 + 0.1 * jax.random.normal(k[2], (d,))).astype(jnp.bfloat16)
    t = jnp.abs(jax.random.normal(k[3], (d,))) * 0.7
    args_ = (x, deltas, scale, t)
    rows = []
    trace_root = Path(tempfile.mkdtemp(prefix="norms_trace_"))
    variants = [("xla", residual_rms_norm_reference)]
    for w in [int(v) for v in args.warps.split(",") if v]:
        variants.append(
            (f"kernel w={w}", functools.partial(residual_rms_norm, impl=impl, num_warps=w))
        )
    for zeros in (False, True):
        for name, fn in variants:
            f = chain(norm_step(fn, zeros), calls)
            wall, spread = time_per_call(f, args_, calls, args.repeats)
            dev = device_us_per_call(
                f, args_, calls, trace_root / f"{name}-{zeros}".replace(" ", "_")
            )
            rows.append(
                {
                    "variant": name,
                    "zeros": zeros,
                    "device_us": dev,
                    "wall_us": wall * 1e6,
                    "wall_spread": spread,
                }
            )
            print(rows[-1], flush=True)
    f = jax.jit(lambda x: [x := pallas_copy(x, impl) for _ in range(calls)])
    wall, spread = time_per_call(f, (x,), calls, args.repeats)
    dev = device_us_per_call(f, (x,), calls, trace_root / "copy")
    rows.append(
        {
            "variant": "copy",
            "zeros": False,
            "device_us": dev,
            "wall_us": wall * 1e6,
            "wall_spread": spread,
        }
    )
    result = {
        "command": "python benchmarks/norms.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "date": datetime.date.today().isoformat(),
        "dim": d,
        "calls": calls,
        "rows": rows,
    }
    write_json_atomic(result, args.json)
    print(f"\nnorms on {result['device']}, jax {jax.__version__}, d={d}, {calls} chained per jit")
    print(f"{'variant':<14} {'zeros':<6} {'device us':>10} {'wall us':>9}")
    for r in rows:
        dev = "-" if r["device_us"] is None else f"{r['device_us']:.2f}"
        print(f"{r['variant']:<14} {r['zeros']!s:<6} {dev:>10} {r['wall_us']:>9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
