"""CATS fitting: one threshold per layer on abs(SiLU(gate)) (ReLU(fc1) for OPT).

`t_l = quantile_s(abs(g))` over all calibration tokens and all channels of layer `l`, so
that a fraction `s` of the gate activations of the dense model falls below it. For OPT the
natural zeros of ReLU count towards `s`: if they already reach it, the threshold is 0.
"""

from __future__ import annotations

from jaxsparse.methods.statistics import CalibrationStats, Requirements

NAME = "cats"


def requirements(options: dict | None = None) -> Requirements:
    return Requirements(points=frozenset({"gate"}))


def cats_thresholds(stats: CalibrationStats, sparsity: float) -> dict[str, dict[str, float]]:
    """`{layers_i: {"gate": t_l}}` (scalars, broadcast to channels by the state)."""
    return {
        f"layers_{i}": {"gate": stats.quantile("gate", i, sparsity)}
        for i in range(stats.num_layers)
    }


def fit(stats: CalibrationStats, sparsity: float, options: dict | None = None, context=None):
    return cats_thresholds(stats, sparsity), {}
