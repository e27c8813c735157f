"""Sparsity fitting: one file per method, turning calibration statistics into thresholds.

`METHODS` maps a method name to its module; each module has `requirements(options)` (which
statistics it needs, see `statistics.Requirements`) and
`fit(stats, sparsity, options, context) -> (values, details)`, where `values` is
`{layers_i: {point: scalar or [width]}}` (made into a `SparsityState` by
`jaxsparse.sparsity.make_state`) and `details` is JSON-able and stored in the state's
metadata. The statistics themselves are gathered once by `statistics.collect_statistics`,
so one calibration run can fit several methods at several sparsities.
"""

from __future__ import annotations

from types import ModuleType

from jaxsparse.methods import cats, chess, chess_plus, teal, wina
from jaxsparse.methods.statistics import CalibrationStats, LogBins, Requirements

METHODS: dict[str, ModuleType] = {
    "cats": cats,
    "chess": chess,
    "chess+": chess_plus,
    "teal": teal,
    "wina": wina,
}

__all__ = [
    "METHODS",
    "CalibrationStats",
    "LogBins",
    "Requirements",
    "check_sparsity",
    "get_method",
]


def get_method(name: str) -> ModuleType:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}") from None


def check_sparsity(s: float) -> float:
    """Returns `s` as a float if it lies in [0, 1); raises ValueError otherwise."""
    try:
        s = float(s)
    except (TypeError, ValueError):
        raise ValueError(f"sparsity {s!r} is not a number; expected a value in [0, 1)") from None
    if not (0.0 <= s < 1.0):
        raise ValueError(
            f"sparsity {s} is outside [0, 1): it is the fraction of activations to zero, e.g. 0.5"
        )
    return s
