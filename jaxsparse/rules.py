"""Sparsity rules: the names of the sparsified tensors and the pure functions that mask them.

The rules layer of docs/design.md: no model imports, no method names, no networks. A model calls `sparsify(x, threshold)` at each
sparsifiable point; what the threshold holds (a per-layer scalar broadcast to channels,
or per-channel values) is decided by the method that fitted it, not here.

An entry is zeroed when `abs(x) < threshold` and kept otherwise, so a threshold of 0
zeroes nothing: the dense model is the all-zeros threshold tree, and one compiled
forward serves every threshold method at every sparsity.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# Points in a decoder block where activations can be sparsified, with the width of each:
#   q_in    input of q_proj (normed hidden state)            [hidden]
#   kv_in   input of k_proj and v_proj                        [hidden]
#   o_in    input of o_proj (attention output)                [num_heads * head_dim]
#   ffn_in  input of gate_proj and up_proj (fc1 for OPT)      [hidden]
#   gate    SiLU(x Wg) (ReLU(x W1 + b1) for OPT); zeroing g_i skips row i of Wu and Wd
#   down_in input of down_proj (fc2 for OPT)                  [intermediate]
TENSORS = ("q_in", "kv_in", "o_in", "ffn_in", "gate", "down_in")


def tensor_width(name: str, hidden: int, q_dim: int, intermediate: int) -> int:
    return {
        "q_in": hidden,
        "kv_in": hidden,
        "o_in": q_dim,
        "ffn_in": hidden,
        "gate": intermediate,
        "down_in": intermediate,
    }[name]


def sparsify(x: jax.Array, threshold: jax.Array | None) -> jax.Array:
    """Zeroes the entries of `x` with `abs(x) < threshold` (threshold broadcast on the last axis)."""
    if threshold is None:
        return x
    keep = jnp.abs(x) >= threshold.astype(x.dtype)
    return jnp.where(keep, x, jnp.zeros((), x.dtype))


def soft_mask(x: jax.Array, threshold: jax.Array, tau: jax.Array | float) -> jax.Array:
    """The relaxed keep-mask `sigmoid((abs(x) - threshold) / tau)`, in float32.

    As `tau -> 0` it tends to the hard mask `abs(x) >= threshold` (0.5 exactly on the
    threshold). `tau` broadcasts like `threshold` (a per-channel temperature is allowed).
    """
    a = jnp.abs(x).astype(jnp.float32)
    return jax.nn.sigmoid((a - threshold) / tau)


def straight_through_mask(x: jax.Array, threshold: jax.Array, tau: jax.Array | float) -> jax.Array:
    """The hard keep-mask in the forward pass, the gradient of `soft_mask` in the backward.

    Its value is exactly `abs(x) >= threshold` (float32 0/1), so a loss computed with it
    is the loss of the mask used at inference; its derivative with respect to `threshold`
    (and `x`) is that of the sigmoid of temperature `tau`.
    """
    soft = soft_mask(x, threshold, tau)
    hard = (jnp.abs(x) >= threshold).astype(jnp.float32)
    return soft + jax.lax.stop_gradient(hard - soft)


def relaxed_sparsify(x: jax.Array, threshold: jax.Array, tau_rel: jax.Array | float) -> jax.Array:
    """`x * straight_through_mask(x, t, tau_rel * t)`: the training-time `sparsify`.

    The temperature is relative to each channel's threshold (`tau_rel * t`, without
    gradient), so one schedule of `tau_rel` serves channels of any scale. The forward value
    equals `sparsify(x, t)`.
    """
    t = threshold.astype(jnp.float32)
    tau = jax.lax.stop_gradient(jnp.maximum(tau_rel * t, 1e-20))
    m = straight_through_mask(x, t, tau)
    return (x.astype(jnp.float32) * m).astype(x.dtype)


def topk_mask(
    scores: jax.Array, k: jax.Array | int, select: str = "auto", radix_bits: int | None = None
) -> jax.Array:
    """Bool mask of the `k` largest entries of `scores` along the last axis.

    `k` may be a traced integer (data, not a static shape), so one compiled function
    serves every k; entries tied with the k-th largest are all kept (-0.0 ties +0.0).
    `k = 0` keeps nothing, `k >= width` keeps everything.

    `select`: how the k-th largest value is found, with the same mask either way: "sort"
    sorts each row (`topk_mask_sorted`); "count" runs a radix select on the scores' bits
    (`kth_largest_by_count`: 32 / `radix_bits` fused counting passes; by default 8 bits on
    a GPU and 1 on a CPU, where XLA's comparison sort of a training batch's rows is 6-20x
    slower, but each pass compiles to its own loop: about 1.3 s of compile per call on 2
    cores, so a model's decode step, with two top-k per layer, sorts); "auto" counts on a
    GPU where there are few rows of a wide axis (a decode step's Deja Vu neuron scores,
    where a sort of the row is many small kernels per layer) and sorts otherwise (prefill,
    short axes, CPU and TPU). `radix_bits` (1, 2, 4 or 8) overrides the bits per pass.
    """
    width = scores.shape[-1]
    backend = jax.default_backend()
    if select == "auto":
        few_wide = width >= RADIX_MIN_WIDTH and math.prod(scores.shape[:-1]) <= RADIX_MAX_ROWS
        select = "count" if few_wide and backend == "gpu" else "sort"
    if select == "sort":
        return topk_mask_sorted(scores, k)
    if select != "count":
        raise ValueError(f"topk_mask: select={select!r}; use 'auto', 'sort' or 'count'")
    if radix_bits is None:
        radix_bits = 1 if backend == "cpu" else _RADIX_BITS
    k = jnp.clip(jnp.asarray(k, jnp.int32), 0, width)
    keys = _order_keys(scores)
    kth = kth_largest_by_count(keys, k, radix_bits)
    return jnp.where(k > 0, keys >= kth[..., None], False)


# Where "auto" selects by counting on a GPU, and the bits per pass there.
RADIX_MIN_WIDTH = 512
RADIX_MAX_ROWS = 64
_RADIX_BITS = 8


def topk_mask_sorted(scores: jax.Array, k: jax.Array | int) -> jax.Array:
    """`topk_mask` by sorting each row (the k-th largest read off the sorted row)."""
    width = scores.shape[-1]
    k = jnp.clip(jnp.asarray(k, jnp.int32), 0, width)
    srt = jnp.sort(scores, axis=-1)  # ascending; `>=` below ties -0.0 with +0.0
    kth = jnp.take(srt, jnp.clip(width - k, 0, width - 1), axis=-1)[..., None]
    return jnp.where(k > 0, scores >= kth, False)


def _order_keys(x: jax.Array) -> jax.Array:
    """uint32 keys in the order of the float32 values of x (-0.0 and +0.0 one key)."""
    x = x.astype(jnp.float32)
    x = jnp.where(x == 0, jnp.float32(0), x)
    b = jax.lax.bitcast_convert_type(x, jnp.uint32)
    sign = jnp.uint32(1 << 31)
    return jnp.where(b >= sign, ~b, b | sign)  # negatives reversed below the positives


def kth_largest_by_count(keys: jax.Array, k: jax.Array, bits: int = _RADIX_BITS) -> jax.Array:
    """The k-th largest of uint32 `keys` along the last axis (1 <= k <= width; k may be
    traced), by a radix select: `bits` bits per pass from the top (1, 2, 4 or 8), each
    pass counting, for every nonzero candidate digit, how many keys are at least the prefix
    so far with that digit, and keeping the largest digit whose count still reaches k (the
    zero digit always does). Each pass is one fused compare-and-count over the row, no
    sort; fewer bits mean more passes of fewer comparisons (2**bits - 1 per key)."""
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"kth_largest_by_count: bits={bits}; use 1, 2, 4 or 8")
    digits = jnp.arange(1, 1 << bits, dtype=jnp.uint32)
    prefix = jnp.zeros(keys.shape[:-1], jnp.uint32)
    for shift in range(32 - bits, -1, -bits):
        cand = prefix[..., None] | (digits << shift)  # [..., 2**bits - 1], increasing
        counts = jnp.sum(keys[..., None, :] >= cand[..., :, None], axis=-1, dtype=jnp.int32)
        best = jnp.sum(counts >= k[..., None], axis=-1, dtype=jnp.int32)  # counts fall
        prefix = prefix | (best.astype(jnp.uint32) << shift)
    return prefix


def zero_fraction(x: jax.Array) -> jax.Array:
    """Fraction of exact zeros over the last axis, per token, in float32."""
    return jnp.mean((x == 0).astype(jnp.float32), axis=-1)


# Keys a layer's sparsity dict may hold besides the points of `TENSORS`:
#   "relax_tau"  scalar: training mode, thresholds applied by `relaxed_sparsify`
#   "masks"      {point: bool [..., width]}: predicted keep-masks (Deja Vu), applied
#                after the point's threshold
#   "predictor"  Deja Vu predictor weights (`jaxsparse.models.predictor`; the model's layer
#                loop feeds them the residual entering the previous block and sets "masks")


# Logical axis names (`jaxsparse.sharding.LOGICAL_AXIS_RULES`) of each point's threshold
# vector, so that a sparsity state is split over devices as the activations it thresholds.
POINT_AXES: dict[str, str] = {
    "q_in": "embed",
    "kv_in": "embed",
    "o_in": "q_heads",
    "ffn_in": "embed",
    "gate": "mlp",
    "down_in": "mlp",
}
