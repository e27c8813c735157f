"""The Deja Vu predictor network the model runs at inference: a low-rank MLP per layer
that scores FFN neurons and attention heads from the residual entering the previous block;
a layer keeps the top-k of each (`jaxsparse.rules.topk_mask`). Its training is
`jaxsparse.predictors`; the model's layer loop calls `predicted_masks`
(`jaxsparse.models.llama.with_predicted_masks`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsparse.rules import topk_mask

# Logical axis names (`jaxsparse.sharding.LOGICAL_AXIS_RULES`) of the predictor weights.
PREDICTOR_AXES: dict[str, tuple[str, ...]] = {
    "ffn_w1": ("embed", "rank"),
    "ffn_b1": ("rank",),
    "ffn_w2": ("rank", "mlp"),
    "ffn_b2": ("mlp",),
    "head_w1": ("embed", "rank"),
    "head_b1": ("rank",),
    "head_w2": ("rank", "heads"),
    "head_b2": ("heads",),
}


def predictor_logits(w: dict, x: jax.Array, which: str) -> jax.Array:
    """Logits of a Deja Vu low-rank predictor: `silu(rms(x) W1 + b1) W2 + b2`.

    `which` is "ffn" (-> [..., m]) or "head" (-> [..., H]); `w` holds `{which}_w1` [d, r],
    `{which}_b1` [r], `{which}_w2` [r, out], `{which}_b2` [out]. The input is divided by its
    root mean square (no learned scale), since the residual's scale grows with depth.
    """
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
    if f"{which}_w1t" in w:  # `decode_layout`: W1 stored [r, d]
        h = jnp.einsum("...d,rd->...r", x, w[f"{which}_w1t"])
    else:
        h = x @ w[f"{which}_w1"]
    h = jax.nn.silu(h + w[f"{which}_b1"])
    return h @ w[f"{which}_w2"] + w[f"{which}_b2"]


def decode_layout(thresholds: dict | None) -> dict | None:
    """The model's `thresholds=` tree with each Deja Vu predictor's `W1` stored
    transposed, `{which}_w1t` [r, d] in place of `{which}_w1` [d, r]; other trees as they
    are. For a decode loop, called once before it: with one token per row XLA turns
    `x @ W1` into a product and a sum over d, which over the rows of a [d, r] array is a
    column sum, 5.5 us per predictor and layer on an H200, against a sum along contiguous
    rows of the [r, d] copy (benchmarks/NOTES_kernels.md)."""
    if thresholds is None:
        return None

    def layer(th):
        if not isinstance(th, dict) or "predictor" not in th:
            return th
        w = dict(th["predictor"])
        for which in ("ffn", "head"):
            if f"{which}_w1" in w:
                w[f"{which}_w1t"] = jnp.swapaxes(w.pop(f"{which}_w1"), -1, -2)
        return {**th, "predictor": w}

    return {name: layer(th) for name, th in thresholds.items()}


def predicted_masks(w: dict, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Deja Vu keep-masks `(ffn [..., m], heads [..., H])`: the top `w["ffn_k"]` neurons
    and the top `w["head_k"]` heads by predictor logit (k's are int32 data)."""
    return (
        topk_mask(predictor_logits(w, x, "ffn"), w["ffn_k"]),
        topk_mask(predictor_logits(w, x, "head"), w["head_k"]),
    )
