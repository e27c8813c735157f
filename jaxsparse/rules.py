"""Sparsity rules: the names of the sparsified tensors and the pure functions that mask them.

Layer 2 of the design: no model imports. A model calls `sparsify(x, threshold)` at each
sparsifiable point; what the threshold holds (a per-layer scalar broadcast to channels,
or per-channel values) is decided by the method that fitted it, not here.

An entry is zeroed when `abs(x) < threshold` and kept otherwise, so a threshold of 0
zeroes nothing: the dense model is the all-zeros threshold tree, and one compiled
forward serves every threshold method at every sparsity.
"""

from __future__ import annotations

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


def topk_mask(scores: jax.Array, k: jax.Array | int) -> jax.Array:
    """Bool mask of the `k` largest entries of `scores` along the last axis.

    `k` may be a traced integer (data, not a static shape), so one compiled function
    serves every k; entries tied with the k-th largest are all kept. `k = 0` keeps
    nothing, `k >= width` keeps everything.
    """
    width = scores.shape[-1]
    k = jnp.clip(jnp.asarray(k, jnp.int32), 0, width)
    srt = jnp.sort(scores, axis=-1)  # ascending
    kth = jnp.take(srt, jnp.clip(width - k, 0, width - 1), axis=-1)[..., None]
    return jnp.where(k > 0, scores >= kth, False)


def predictor_logits(w: dict, x: jax.Array, which: str) -> jax.Array:
    """Logits of a Deja Vu low-rank predictor: `silu(rms(x) W1 + b1) W2 + b2`.

    `which` is "ffn" (-> [..., m]) or "head" (-> [..., H]); `w` holds `{which}_w1` [d, r],
    `{which}_b1` [r], `{which}_w2` [r, out], `{which}_b2` [out]. The input is divided by its
    root mean square (no learned scale), since the residual's scale grows with depth.
    """
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
    h = jax.nn.silu(x @ w[f"{which}_w1"] + w[f"{which}_b1"])
    return h @ w[f"{which}_w2"] + w[f"{which}_b2"]


def predicted_masks(w: dict, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Deja Vu keep-masks `(ffn [..., m], heads [..., H])`: the top `w["ffn_k"]` neurons
    and the top `w["head_k"]` heads by predictor logit (k's are int32 data)."""
    return (
        topk_mask(predictor_logits(w, x, "ffn"), w["ffn_k"]),
        topk_mask(predictor_logits(w, x, "head"), w["head_k"]),
    )


def zero_fraction(x: jax.Array) -> jax.Array:
    """Fraction of exact zeros over the last axis, per token, in float32."""
    return jnp.mean((x == 0).astype(jnp.float32), axis=-1)


# Per method, the points whose projections a decode step runs through the sparse kernels
# (`jaxsparse.models.Kernels`): where the method makes zeros. Zeroing the gate (CATS,
# CHESS) zeroes the down input too.
KERNEL_POINTS: dict[str, tuple[str, ...]] = {
    "dense": (),
    "cats": ("gate", "down_in"),
    "chess": ("gate", "down_in"),
    # kv_in is dense here (threshold 0), but XLA reads a [d, 2 kv] matvec at a third of
    # the bandwidth the kernel reaches (H100 profile), so k/v go through it too.
    "chess+": ("q_in", "kv_in", "o_in", "gate", "down_in"),
    "teal": ("q_in", "kv_in", "o_in", "ffn_in", "down_in"),
    # WINA: TEAL's points, per-channel thresholds `T / n_i` (docs/methods.md).
    "wina": ("q_in", "kv_in", "o_in", "ffn_in", "down_in"),
    # Learned thresholds zero what the closed-form method they start from zeroes.
    "chess-learned": ("gate", "down_in"),
    "teal-learned": ("q_in", "kv_in", "o_in", "ffn_in", "down_in"),
    # End-to-end learned (`jaxsparse learn-kl`): any of the points.
    "kl-learned": ("q_in", "kv_in", "o_in", "ffn_in", "gate", "down_in"),
    # Deja Vu: predicted FFN neurons zero the gate; predicted heads zero o_proj's input
    # (q/k/v stay dense here: see docs/learned.md).
    "dejavu": ("o_in", "gate", "down_in"),
}

# Keys a layer's sparsity dict may hold besides the points of `TENSORS`:
#   "relax_tau"  scalar: training mode, thresholds applied by `relaxed_sparsify`
#   "masks"      {point: bool [..., width]}: predicted keep-masks (Deja Vu), applied
#                after the point's threshold
#   "predictor"  Deja Vu predictor weights (`predicted_masks`; the model's layer loop feeds
#                them the residual entering the previous block and sets "masks")


# Methods whose q and k/v inputs always carry the same threshold (or none), so that q/k/v
# can run as one fused matmul; the others (chess+, teal-learned) fuse only k and v.
SHARED_QKV_INPUT = frozenset({"dense", "cats", "chess", "chess-learned", "teal", "wina", "dejavu"})


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
_PREDICTOR_AXES = {
    "ffn_w1": ("embed", "rank"),
    "ffn_b1": ("rank",),
    "ffn_w2": ("rank", "mlp"),
    "ffn_b2": ("mlp",),
    "head_w1": ("embed", "rank"),
    "head_b1": ("rank",),
    "head_w2": ("rank", "heads"),
    "head_b2": ("heads",),
}


def state_logical_axes(tree: dict) -> dict:
    """The model's `thresholds=` tree (`SparsityState.thresholds_for_model()`) with each
    leaf replaced by its logical axis names (a PartitionSpec; scalars replicated)."""
    from jax.sharding import PartitionSpec as P

    def layer(th: dict) -> dict:
        out = {}
        for key, v in th.items():
            if key in POINT_AXES:
                out[key] = P(POINT_AXES[key])
            elif key == "predictor":
                out[key] = {k: P(*_PREDICTOR_AXES.get(k, ())) for k in v}
            else:  # relax_tau, k's: scalars
                out[key] = jax.tree.map(lambda _: P(), v)
        return out

    return {name: layer(th) for name, th in tree.items()}
