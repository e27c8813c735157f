"""CHESS+ fitting: CHESS on the FFN, plus per-layer thresholds on the attention inputs.

`q_in` (input of q_proj) and `o_in` (input of o_proj) each get
`t_l = quantile_s(abs(input))` over all calibration tokens and channels of the layer; the
k/v input stays dense (a thresholded k/v input would damage the KV cache for every later
token).
"""

from __future__ import annotations

from jaxsparse.methods import chess
from jaxsparse.methods.statistics import CalibrationStats, Requirements

NAME = "chess+"


def requirements(options: dict | None = None) -> Requirements:
    return chess.requirements() | Requirements(points=frozenset({"q_in", "o_in"}))


def chess_plus_thresholds(stats: CalibrationStats, sparsity: float) -> dict:
    out = chess.chess_thresholds(stats, sparsity)
    for i in range(stats.num_layers):
        out[f"layers_{i}"]["q_in"] = stats.quantile("q_in", i, sparsity)
        out[f"layers_{i}"]["o_in"] = stats.quantile("o_in", i, sparsity)
    return out


def fit(stats: CalibrationStats, sparsity: float, options: dict | None = None, context=None):
    return chess_plus_thresholds(stats, sparsity), {}
