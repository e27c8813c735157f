"""XLA GPU and one-row matvecs: which `x @ W` shapes XLA compiles as a broadcast-multiply-reduce
fusion instead of a GEMM, and what that costs. Each shape: 16 dots on 16 weight buffers in one
jit (median of 7 wall-clock runs per call, the per-execution cost spread over the 16), and the
count of reduce fusions and GEMM fusions in the compiled HLO; `rows=2` pads the one row with a
zero row.  Usage: python benchmarks/gemv_rewrite.py  (prints one line per shape)."""

import time

import jax
import jax.numpy as jnp
import numpy as np


def bench(K, N, rows, nbuf=16):
    ws = [jax.random.normal(jax.random.key(i), (K, N), jnp.bfloat16) for i in range(nbuf)]
    x = jax.random.normal(jax.random.key(99), (1, 1, K), jnp.bfloat16)

    def f(x, ws):
        acc = 0.0
        xx = x if rows == 1 else jnp.concatenate([x, jnp.zeros((1, rows - 1, K), x.dtype)], 1)
        for w in ws:
            y = jnp.dot(xx, w, preferred_element_type=jnp.float32)[:, :1]
            acc = acc + y
        return acc

    jf = jax.jit(f).lower(x, ws).compile()  # compiled once: timed and read as HLO
    txt = jf.as_text()
    kinds = {
        "reduce_fusion": txt.count("input_reduce_fusion") + txt.count("loop_reduce_fusion"),
        "gemm": txt.count("gemm_fusion_dot"),
        "triton_or_cublas": txt.count("custom-call"),
    }
    jf(x, ws).block_until_ready()
    ts = []
    for _ in range(7):
        t = time.perf_counter()
        jf(x, ws).block_until_ready()
        ts.append(time.perf_counter() - t)
    us = np.median(ts) / nbuf * 1e6
    print(
        f"K={K} N={N} rows={rows}: {us:.1f} us/call (wall, incl. per-exec cost / {nbuf}); {K * N * 2 / us / 1e6:.2f} TB/s; {kinds}",
        flush=True,
    )


if __name__ == "__main__":
    for K, N, rows in [
        (4096, 4096, 1),
        (2048, 4096, 1),
        (2048, 4096, 2),
        (7168, 4096, 1),
        (1024, 4096, 1),
        (1024, 4096, 2),
    ]:
        bench(K, N, rows)
