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


def zero_fraction(x: jax.Array) -> jax.Array:
    """Fraction of exact zeros over the last axis, per token, in float32."""
    return jnp.mean((x == 0).astype(jnp.float32), axis=-1)


# Per method, the points whose projections a decode step runs through the sparse kernels
# (`jaxsparse.models.Kernels`): where the method makes zeros. Zeroing the gate (CATS,
# CHESS) zeroes the down input too; the k/v inputs of CHESS+ stay dense.
KERNEL_POINTS: dict[str, tuple[str, ...]] = {
    "dense": (),
    "cats": ("gate", "down_in"),
    "chess": ("gate", "down_in"),
    "chess+": ("q_in", "o_in", "gate", "down_in"),
    "teal": ("q_in", "kv_in", "o_in", "ffn_in", "down_in"),
}
