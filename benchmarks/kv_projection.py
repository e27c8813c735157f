"""How XLA lowers the decode step's k/v projections (x[1, 4096] @ W[4096, 1024]), in a
stack of 32 layers like a Llama-3-8B decode step, and what makes it read at bandwidth.

    python benchmarks/kv_projection.py

Variants (each: 32 layers, fresh weights per layer, inside one jit, median of 20):
  separate_f32   k = dot(x, Wk) in float32, then RoPE and a cache write (the model's path)
  separate_bf16  the same with a bfloat16 dot output
  fused_kv       one dot with [Wk | Wv] (4096 x 2048), then split
  fused_qkv      one dot with [Wq | Wk | Wv] (4096 x 6144), then split
Prints microseconds per layer and the GB/s of the weights read.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

L, D, KV, Q, S = 32, 4096, 1024, 4096, 256


def rope(k):
    k = k.astype(jnp.float32).reshape(1, 8, 128)
    rot = jnp.concatenate([-k[..., 64:], k[..., :64]], -1)
    return (k * 0.5 + rot * 0.25).astype(jnp.bfloat16)


def step(variant):
    def layer(x, ws, cache_k, cache_v, i):
        if variant == "fused_qkv":
            y = jnp.dot(x, ws["qkv"], preferred_element_type=jnp.float32).astype(jnp.bfloat16)
            q, k, v = y[:, :Q], y[:, Q : Q + KV], y[:, Q + KV :]
        elif variant == "fused_kv":
            q = jnp.dot(x, ws["q"], preferred_element_type=jnp.float32).astype(jnp.bfloat16)
            y = jnp.dot(x, ws["kv"], preferred_element_type=jnp.float32).astype(jnp.bfloat16)
            k, v = y[:, :KV], y[:, KV:]
        else:
            pet = jnp.float32 if variant == "separate_f32" else jnp.bfloat16
            q = jnp.dot(x, ws["q"], preferred_element_type=pet).astype(jnp.bfloat16)
            k = jnp.dot(x, ws["k"], preferred_element_type=pet).astype(jnp.bfloat16)
            v = jnp.dot(x, ws["v"], preferred_element_type=pet).astype(jnp.bfloat16)
        cache_k = jax.lax.dynamic_update_slice_in_dim(cache_k, rope(k)[:, :, None], i, axis=2)
        cache_v = jax.lax.dynamic_update_slice_in_dim(cache_v, v.reshape(1, 8, 1, 128), i, axis=2)
        return x + 0.001 * q[:, :D] + 0.001 * jnp.sum(cache_k) + 0.001 * jnp.sum(cache_v)

    def f(x, weights, caches, i):
        for l in range(L):
            x = layer(x, weights[l], caches[l][0], caches[l][1], i)
        return x

    return jax.jit(f)


def main():
    key = jax.random.key(0)
    x = jax.random.normal(key, (1, D), jnp.bfloat16)
    caches = [(jnp.zeros((1, 8, S, 128), jnp.bfloat16),) * 2 for _ in range(L)]
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}")
    print(f"{'variant':14} {'us/layer':>9} {'weights GB/s':>13}")
    for variant in ("separate_f32", "separate_bf16", "fused_kv", "fused_qkv"):
        ws = []
        for l in range(L):
            k = jax.random.fold_in(key, l)
            w = (0.02 * jax.random.normal(k, (D, Q + 2 * KV), jnp.float32)).astype(jnp.bfloat16)
            ws.append(
                {"qkv": w}
                if variant == "fused_qkv"
                else {"q": w[:, :Q], "kv": w[:, Q:]}
                if variant == "fused_kv"
                else {"q": w[:, :Q], "k": w[:, Q : Q + KV], "v": w[:, Q + KV :]}
            )
        f = step(variant)
        jax.block_until_ready(f(x, ws, caches, 3))
        ts = []
        for _ in range(20):
            t0 = time.perf_counter()
            jax.block_until_ready(f(x, ws, caches, 3))
            ts.append(time.perf_counter() - t0)
        us = statistics.median(ts) / L * 1e6
        gbps = D * (Q + 2 * KV) * 2 / (us * 1e-6) / 1e9
        print(f"{variant:14} {us:9.2f} {gbps:13.0f}")


if __name__ == "__main__":
    main()
