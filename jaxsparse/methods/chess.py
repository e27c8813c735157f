"""CHESS fitting: channel-wise thresholds on the FFN gate activations.

Importance of channel `i` of layer `l` on a token: `abs(g_i) * E abs(u_i)` (`g = SiLU(x Wg)`,
`u = x Wu`, the mean over calibration tokens). `Q_l = quantile_s(importance)` over all
calibration tokens and channels of the layer; `t_{l,i} = Q_l / E abs(u_i)`, so that `g_i` is
zeroed exactly when its importance is below `Q_l`. A channel with `E abs(u_i) = 0` is
always zeroed (its threshold is the largest float32). OPT has no `u`: `E abs(u_i) = 1`,
and chess reduces to cats on the ReLU output.
"""

from __future__ import annotations

import numpy as np

from jaxsparse.methods.statistics import CalibrationStats, Requirements

NAME = "chess"
ALWAYS_ZERO = float(np.finfo(np.float32).max)


def requirements(options: dict | None = None) -> Requirements:
    return Requirements(importance=True)


def chess_thresholds(stats: CalibrationStats, sparsity: float) -> dict[str, dict[str, np.ndarray]]:
    """`{layers_i: {"gate": t [intermediate]}}`."""
    if stats.importance_hist is None or stats.mean_abs_u is None:
        raise ValueError("chess needs the importance histogram and E|u| (two-pass statistics)")
    out = {}
    for i in range(stats.num_layers):
        q = stats.bins.quantile(stats.importance_hist[i], sparsity)
        mean_u = stats.mean_abs_u[i].astype(np.float64)
        with np.errstate(divide="ignore"):
            t = np.where(mean_u > 0, q / np.maximum(mean_u, 1e-300), ALWAYS_ZERO if q > 0 else 0.0)
        out[f"layers_{i}"] = {"gate": np.minimum(t, ALWAYS_ZERO).astype(np.float32)}
    return out


def fit(stats: CalibrationStats, sparsity: float, options: dict | None = None, context=None):
    return chess_thresholds(stats, sparsity), {}
