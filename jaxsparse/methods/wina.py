"""WINA fitting: weight-informed magnitude thresholds on the inputs of every linear layer.

WINA (weight-informed neuron activation) scores input channel `i` of a linear layer by
`abs(x_i) * n_i`, where `n_i` is the L2 norm of the channel's weights: row `i` of the
kernel (stored `[in, out]`), i.e. how much the channel can move the layer's output per
unit of activation. It thresholds the same points as TEAL, in the same four groups per
layer (qkv, o, gate_up, down; `methods.teal`); a group's input feeding several matrices
(q/k/v, gate/up) takes `n_i` of their concatenation (`statistics.input_row_norms`).

Fitting: `T_{l,g} = quantile_{s_g}(abs(x_i) * n_i)` over all calibration tokens and
channels of the layer (dense model), `s_g = S` (uniform) or chosen by TEAL's greedy
allocation (`teal.greedy_allocation`, run with WINA's thresholds). Inference keeps
`x_i` when `abs(x_i) * n_i >= T`, stored as the per-channel threshold `t_i = T / n_i` on
`abs(x_i)`: the state is an ordinary per-channel threshold tree, so the same compiled
model and the same sparse-input kernels serve it. A channel with `n_i = 0` contributes
nothing and is always zeroed (threshold: the largest float32) when `T > 0`.
"""

from __future__ import annotations

import numpy as np

from jaxsparse.methods import teal
from jaxsparse.methods.statistics import CalibrationStats, Requirements

NAME = "wina"
GROUPS = teal.GROUPS
# The point whose weighted histogram and norms stand for the group (q_in and kv_in are one
# tensor with one set of norms).
GROUP_POINT = {"qkv": "q_in", "o": "o_in", "gate_up": "ffn_in", "down": "down_in"}
DEFAULT_OPTIONS = teal.DEFAULT_OPTIONS
ALWAYS_ZERO = float(np.finfo(np.float32).max)


def requirements(options: dict | None = None) -> Requirements:
    opts = {**DEFAULT_OPTIONS, **(options or {})}
    return Requirements(
        weighted_points=frozenset(GROUP_POINT.values()), block_inputs=opts["allocation"] == "greedy"
    )


def per_channel(score_threshold: float, norms: np.ndarray) -> np.ndarray:
    """`T / n_i` as float32 (`n_i = 0`: always zeroed when `T > 0`, kept when `T = 0`)."""
    n = np.asarray(norms, np.float64)
    if score_threshold <= 0:
        return np.zeros(n.shape, np.float32)
    with np.errstate(divide="ignore"):
        t = np.where(n > 0, score_threshold / np.maximum(n, 1e-300), ALWAYS_ZERO)
    return np.minimum(t, ALWAYS_ZERO).astype(np.float32)


def group_thresholds(
    stats: CalibrationStats, layer: int, sparsities: dict[str, float]
) -> dict[str, np.ndarray]:
    """Per-channel point thresholds of one layer for per-group sparsities."""
    out = {}
    for g, s in sparsities.items():
        p = GROUP_POINT[g]
        t = per_channel(stats.weighted_quantile(p, layer, s), stats.row_norms[p][layer])
        for point in teal.GROUP_POINTS[g]:
            out[point] = t
    return out


def wina_uniform(stats: CalibrationStats, sparsity: float) -> dict:
    return {
        f"layers_{i}": group_thresholds(stats, i, {g: sparsity for g in GROUPS})
        for i in range(stats.num_layers)
    }


def fit(stats: CalibrationStats, sparsity: float, options: dict | None = None, context=None):
    """`context` (greedy only): dict with config, params, block_inputs, valid."""
    return teal.fit_allocated(
        "wina", wina_uniform, group_thresholds, stats, sparsity, options, context
    )
