"""The activated-params budget: measure a state's fraction of weights read on token rows,
and solve a knob (a sparsity, a threshold scale, a top-k) for a target fraction.

The fraction is `jaxsparse.sparsity.activated_params_fraction`, measured by the forward
`jaxsparse eval` runs (`jaxsparse.measure.make_forward`), so a solved knob hits the number `eval`
reports on the same text. Used by `jaxsparse sweep --fractions` (every method at equal
fractions) and `jaxsparse learn-kl` (the rescale onto the budget).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


class BudgetError(ValueError):
    """A target fraction out of a knob's reach."""


class FractionMeter:
    """`meter(thresholds)`: the activated-params fraction of a model's `thresholds=` tree
    (or a `{layer: {point: values}}` dict, completed with zeros) on fixed token rows."""

    def __init__(self, config, params, seqs_NxT: np.ndarray, batch: int = 8):
        from jaxsparse.measure import make_forward

        self.config, self.params, self.seqs, self.batch = config, params, seqs_NxT, batch
        self.forward = make_forward(config)

    def __call__(self, thresholds: dict) -> float:
        import jax.numpy as jnp

        from jaxsparse.sparsity import thresholds_from_values

        first = next(iter(thresholds.values()))
        if "predictor" not in first and set(first) != set(self.config_points()):
            thresholds = thresholds_from_values(self.config, thresholds)
        read = count = 0.0
        for s in range(0, len(self.seqs), self.batch):
            rows = self.seqs[s : s + self.batch]
            valid = np.ones(rows.shape, bool)
            if len(rows) < self.batch:  # one compiled shape
                pad = self.batch - len(rows)
                rows = np.concatenate([rows, np.zeros((pad, rows.shape[1]), rows.dtype)])
                valid = np.concatenate([valid, np.zeros((pad, valid.shape[1]), bool)])
            out = self.forward(self.params, jnp.asarray(rows), jnp.asarray(valid), thresholds)
            read += float(out["read_sum"])
            count += float(out["count"])
        return read / max(count, 1.0)

    @staticmethod
    def config_points():
        from jaxsparse.rules import TENSORS

        return TENSORS


def solve_decreasing(
    f: Callable[[float], float],
    target: float,
    a: float,
    b: float,
    tol: float,
    max_iter: int = 30,
    fa: float | None = None,
    fb: float | None = None,
    trace: list | None = None,
) -> tuple[float, float]:
    """`x` in `[a, b]` with `f(x)` (non-increasing) within `tol` of `target`, by regula
    falsi (Illinois); returns `(x, f(x))` of the closest point evaluated. Raises
    BudgetError when `target` is outside `[f(b), f(a)]`."""
    trace = [] if trace is None else trace

    def g(x):
        v = float(f(x))
        trace.append((float(x), v))
        return v - target

    ga = g(a) if fa is None else fa - target
    gb = g(b) if fb is None else fb - target
    if ga < -tol or gb > tol:
        raise BudgetError(
            f"target fraction {target} is out of reach: from {gb + target:.4f} to {ga + target:.4f}"
        )
    best = (a, ga) if abs(ga) < abs(gb) else (b, gb)
    side = 0
    for _ in range(max_iter):
        if abs(best[1]) <= tol:
            break
        x = b - gb * (b - a) / (gb - ga) if gb != ga else 0.5 * (a + b)
        if not a < x < b:
            x = 0.5 * (a + b)
        gx = g(x)
        if abs(gx) < abs(best[1]):
            best = (x, gx)
        if gx > 0:  # too dense: the root lies above x
            a, ga = x, gx
            if side == -1:
                gb /= 2
            side = -1
        else:
            b, gb = x, gx
            if side == 1:
                ga /= 2
            side = 1
    return best[0], best[1] + target


def solve_scale(
    measure: Callable[[float], float], target: float, tol: float, max_iter: int = 30
) -> tuple[float, float, list]:
    """`log c` with `measure(log c)` (non-increasing) within `tol` of `target`: a bracket
    grown from [-0.5, 0.5], then `solve_decreasing`. Returns (log c, fraction, trace)."""
    trace: list = []

    def f(x):
        v = float(measure(x))
        trace.append((float(x), v))
        return v

    a, b = -0.5, 0.5
    fa, fb = f(a), f(b)
    while fa < target and a > -40:  # even the smaller thresholds read too little
        b, fb, a = a, fa, a - 2 * (b - a)
        fa = f(a)
    while fb > target and b < 40:
        a, fa, b = b, fb, b + 2 * (b - a)
        fb = f(b)
    x, v = solve_decreasing(measure, target, a, b, tol, max_iter, fa, fb, trace)
    return x, v, trace
