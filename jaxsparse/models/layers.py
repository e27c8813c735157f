"""Building blocks shared by the model families: linear, norms, RoPE, attention, KV cache.

Params carry logical axis names (`nn.with_logical_partitioning`), mapped to mesh axes by
`jaxsparse.sharding`. Kernels are stored `[in, out]` (`y = x @ kernel`), so the row of an
input channel is contiguous: the layout the sparse-input kernels read.

The KV cache is explicit data, not a Flax collection: a dict with `pos` [B, S] (the
position held by each slot, -1 for empty or padding) and one `{"k", "v"}` [B, S, Hkv, Dh]
entry per layer. One write index is shared by the batch (prompts are left-padded).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse.config import ModelConfig, rope_inv_freq

MASK_VALUE = -1e30  # finite, so a row with nothing to attend (padding) gives no NaN


def param_dtype(config: ModelConfig):
    return jnp.dtype(config.dtype)


class Linear(nn.Module):
    features: int
    axes: tuple[str, str]
    use_bias: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), self.axes),
            (x.shape[-1], self.features),
            self.dtype,
        )
        y = jnp.dot(x.astype(self.dtype), kernel, preferred_element_type=jnp.float32)
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:]),
                (self.features,),
                self.dtype,
            )
            y = y + bias.astype(jnp.float32)
        return y.astype(self.dtype)


class RMSNorm(nn.Module):
    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
            (x.shape[-1],), self.dtype,
        )
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale * x32.astype(self.dtype)  # HF: weight * hidden.to(input_dtype)


class LayerNorm(nn.Module):
    eps: float
    affine: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        if self.affine:
            init = nn.with_logical_partitioning
            scale = self.param("scale", init(nn.initializers.ones, ("norm",)), (x.shape[-1],),
                               self.dtype)
            bias = self.param("bias", init(nn.initializers.zeros, ("norm",)), (x.shape[-1],),
                              self.dtype)
            y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


class Embed(nn.Module):
    num_embeddings: int
    features: int
    axes: tuple[str, str] = ("vocab", "embed")
    dtype: Any = jnp.float32

    def setup(self):
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), self.axes),
            (self.num_embeddings, self.features),
            self.dtype,
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding, ids, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied output projection: x @ embedding^T, in float32."""
        return jnp.dot(x.astype(self.dtype), self.embedding.T, preferred_element_type=jnp.float32)


def rope_cos_sin(config: ModelConfig, positions_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    inv_freq = jnp.asarray(rope_inv_freq(config))
    pos = jnp.maximum(positions_BxT, 0).astype(jnp.float32)
    freqs_BxTxF = pos[..., None] * inv_freq
    emb = jnp.concatenate([freqs_BxTxF, freqs_BxTxF], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_BxTxHxD: jax.Array, cos_BxTxD: jax.Array, sin_BxTxD: jax.Array) -> jax.Array:
    """HF Llama's rotate-half RoPE, in float32."""
    x = x_BxTxHxD.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x * cos_BxTxD[:, :, None, :] + rotated * sin_BxTxD[:, :, None, :]
    return out.astype(x_BxTxHxD.dtype)


def attention_mask(q_pos_BxT: jax.Array, kv_pos_BxS: jax.Array,
                   sliding_window: int | None = None) -> jax.Array:
    """[B, T, S] bool: causal over positions, empty or padded slots (pos < 0) excluded."""
    q = q_pos_BxT[:, :, None]
    k = kv_pos_BxS[:, None, :]
    mask = (k >= 0) & (k <= q)
    if sliding_window is not None:
        mask &= (q - k) < sliding_window
    return mask


def attend(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask_BxTxS, scale: float) -> jax.Array:
    """Grouped-query attention; softmax in float32. Returns [B, T, H * D]."""
    b, t, h, d = q_BxTxHxD.shape
    kv_heads = k_BxSxKxD.shape[2]
    q_BxTxKxGxD = q_BxTxHxD.reshape(b, t, kv_heads, h // kv_heads, d)
    scores_BxKxGxTxS = jnp.einsum(
        "btkgd,bskd->bkgts", q_BxTxKxGxD, k_BxSxKxD, preferred_element_type=jnp.float32
    ) * scale
    scores_BxKxGxTxS = jnp.where(mask_BxTxS[:, None, None], scores_BxKxGxTxS, MASK_VALUE)
    probs = jax.nn.softmax(scores_BxKxGxTxS, axis=-1).astype(v_BxSxKxD.dtype)
    out_BxTxKxGxD = jnp.einsum(
        "bkgts,bskd->btkgd", probs, v_BxSxKxD, preferred_element_type=jnp.float32
    )
    return out_BxTxKxGxD.reshape(b, t, h * d).astype(q_BxTxHxD.dtype)


def update_layer_cache(layer_cache: dict, k_BxTxKxD, v_BxTxKxD, index) -> dict:
    k = jax.lax.dynamic_update_slice_in_dim(layer_cache["k"], k_BxTxKxD.astype(
        layer_cache["k"].dtype), index, axis=1)
    v = jax.lax.dynamic_update_slice_in_dim(layer_cache["v"], v_BxTxKxD.astype(
        layer_cache["v"].dtype), index, axis=1)
    return {"k": k, "v": v}


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
    """An empty KV cache for `batch` sequences of up to `max_len` tokens."""
    dtype = jnp.dtype(dtype or config.dtype)
    shape = (batch, max_len, config.num_kv_heads, config.head_dim)
    cache = {"pos": jnp.full((batch, max_len), -1, jnp.int32)}
    for i in range(config.num_layers):
        cache[f"layers_{i}"] = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
    return cache


def positions_from_mask(valid_BxT: np.ndarray | jax.Array, start=0):
    """Positions 0, 1, ... over the valid (non-padding) tokens of each row; -1 on padding."""
    valid = jnp.asarray(valid_BxT).astype(jnp.int32)
    return jnp.where(valid > 0, jnp.cumsum(valid, axis=-1) - 1 + start, -1)
