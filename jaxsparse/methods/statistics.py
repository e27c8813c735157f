"""Calibration statistics shared by the threshold methods, gathered in constant memory.

Holds `LogBins` (a fixed log-spaced histogram and its quantile), `CalibrationStats`
(per-layer histograms of `abs(activation)` per sparsification point, `E abs(u_i)`, the CHESS
importance histogram) and `collect_statistics`, which runs jit-compiled batched forward
passes of the dense model and streams every batch into those statistics, so memory does
not grow with the number of calibration tokens. It holds no method logic: each method's
file turns these statistics into thresholds.

Histogram: bin 0 is `[0, lo)` (exact zeros, e.g. ReLU's, fall there), bins `1..num` split
`[lo, hi)` into `num` log-spaced bins of ratio `r = (hi / lo) ** (1 / num)`, bin `num + 1`
is `[hi, inf)`. With the defaults (1e-8 .. 1e4, 8192 bins) `r - 1 = 0.34%`: a quantile
interpolated linearly inside its bin lies in the same bin as the exact sample quantile
`x_(ceil(qN))` (the smallest value with a cumulative fraction >= q;
`np.quantile(x, q, method="inverted_cdf")`), so within a relative 0.34% of it, whatever
the data.

CHESS importance `abs(g_i) * E abs(u_i)` needs `E abs(u_i)` first: we make two passes
over the same calibration tokens (pass 1: means and the other histograms; pass 2: the
importance histogram with the final means). That keeps memory at one histogram per
layer and makes the statistic exactly the one in docs/methods.md, at the price of a second
forward pass for chess/chess+.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from jaxsparse import rules
from jaxsparse.config import ModelConfig
from jaxsparse.measure import dense_taps, tap  # TAP_PATHS: where each point is sown


@dataclasses.dataclass(frozen=True)
class LogBins:
    """Fixed log-spaced bins for `abs` values; see the module docstring."""

    lo: float = 1e-8
    hi: float = 1e4
    num: int = 8192

    @property
    def ratio(self) -> float:
        return (self.hi / self.lo) ** (1.0 / self.num)

    @property
    def size(self) -> int:
        return self.num + 2

    def edges(self) -> np.ndarray:
        """The `num + 1` edges from `lo` to `hi` (float64)."""
        return self.lo * np.exp(np.arange(self.num + 1) * (math.log(self.hi / self.lo) / self.num))

    def index(self, abs_x):
        """Bin index (int32) of each entry of `abs_x` (a jax array, non-negative)."""
        import jax.numpy as jnp

        a = abs_x.astype(jnp.float32)
        inv_step = self.num / math.log(self.hi / self.lo)
        k = jnp.floor((jnp.log(jnp.maximum(a, self.lo)) - math.log(self.lo)) * inv_step)
        k = jnp.clip(k.astype(jnp.int32) + 1, 1, self.num)
        k = jnp.where(a < self.lo, 0, k)
        return jnp.where(a >= self.hi, self.num + 1, k)

    def histogram(self, abs_x, valid):
        """Counts [size] (int32) of `abs_x` [..., W] over the tokens where `valid` [...]."""
        import jax.numpy as jnp

        idx = self.index(abs_x)
        idx = jnp.where(valid[..., None], idx, self.size)  # padding goes to a dropped bin
        counts = jnp.zeros((self.size + 1,), jnp.int32).at[idx.reshape(-1)].add(1)
        return counts[: self.size]

    def quantile(self, counts: np.ndarray, q: float) -> float:
        """The value below which a fraction `q` of the counted values lies.

        Linear interpolation inside the bin where the cumulative count reaches `q * total`.
        `q = 0` gives 0 exactly (nothing is zeroed at sparsity 0).
        """
        counts = np.asarray(counts, np.float64)
        total = counts.sum()
        if total <= 0:
            raise ValueError("quantile of an empty histogram")
        if q <= 0:
            return 0.0
        target = q * total
        cum = np.cumsum(counts)
        k = int(np.searchsorted(cum, target, side="left"))
        k = min(k, self.size - 1)
        if k == self.size - 1:
            return float(self.hi)
        below = cum[k - 1] if k > 0 else 0.0
        frac = (target - below) / counts[k] if counts[k] > 0 else 0.0
        edges = self.edges()
        left = 0.0 if k == 0 else edges[k - 1]
        right = self.lo if k == 0 else edges[k]
        return float(left + frac * (right - left))

    def fraction_below(self, counts: np.ndarray, value: float) -> float:
        """The inverse of `quantile`: the fraction of counted values below `value`."""
        counts = np.asarray(counts, np.float64)
        total = counts.sum()
        if value <= 0:
            return 0.0
        if value >= self.hi:
            return float(counts[:-1].sum() / total)
        edges = self.edges()
        if value < self.lo:
            k, left, right = 0, 0.0, self.lo
        else:
            k = int(np.searchsorted(edges, value, side="right"))  # edges[k-1] <= value
            k = min(max(k, 1), self.num)
            left, right = edges[k - 1], edges[k]
        frac = (value - left) / (right - left)
        return float((counts[:k].sum() + frac * counts[k]) / total)


@dataclasses.dataclass
class CalibrationStats:
    """What the threshold methods are fitted from; numpy, host memory, fixed size.

    `hist[point]` is [num_layers, bins.size] (int64) of abs(raw activation) of the dense
    model over the valid calibration tokens (and all channels). `mean_abs_u` is
    [num_layers, intermediate] E abs(u_i) (ones for OPT, which has no up projection).
    `importance_hist` is [num_layers, bins.size] of abs(g_i) * E abs(u_i).
    """

    bins: LogBins
    num_layers: int
    tokens: int
    hist: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    mean_abs_u: np.ndarray | None = None
    importance_hist: np.ndarray | None = None
    # WINA: `weighted_hist[point]` [L, size] of abs(x_i) * n_i over tokens and channels,
    # with `row_norms[point]` [L, width] the n_i used (see `input_row_norms`).
    weighted_hist: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    row_norms: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def quantile(self, point: str, layer: int, q: float) -> float:
        if point not in self.hist:
            raise KeyError(f"no histogram of {point!r} was collected")
        return self.bins.quantile(self.hist[point][layer], q)

    def weighted_quantile(self, point: str, layer: int, q: float) -> float:
        """Quantile of `abs(x_i) * n_i` (WINA's score) of `point` in `layer`."""
        if point not in self.weighted_hist:
            raise KeyError(f"no weight-scaled histogram of {point!r} was collected")
        return self.bins.quantile(self.weighted_hist[point][layer], q)


@dataclasses.dataclass(frozen=True)
class Requirements:
    """Which statistics a method needs."""

    points: frozenset[str] = frozenset()  # histograms of abs(raw activation)
    importance: bool = False  # CHESS importance histogram (implies E abs(u))
    block_inputs: bool = False  # dense block inputs (TEAL greedy allocation)
    weighted_points: frozenset[str] = frozenset()  # histograms of abs(x_i) * n_i (WINA)

    def __or__(self, other: Requirements) -> Requirements:
        return Requirements(
            self.points | other.points,
            self.importance or other.importance,
            self.block_inputs or other.block_inputs,
            self.weighted_points | other.weighted_points,
        )


# The matrices each input point feeds, as (module, projection) under `layers_i`; a point
# feeding several matrices (q_in: q/k/v, ffn_in: gate/up) reads their concatenation.
_POINT_MATRICES = {
    "llama": {
        "q_in": (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj")),
        "kv_in": (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj")),
        "o_in": (("self_attn", "o_proj"),),
        "ffn_in": (("mlp", "gate_proj"), ("mlp", "up_proj")),
        "down_in": (("mlp", "down_proj"),),
    },
    "opt": {
        "q_in": (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj")),
        "kv_in": (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj")),
        "o_in": (("self_attn", "o_proj"),),
        "ffn_in": (("mlp", "fc1"),),
        "down_in": (("mlp", "fc2"),),
    },
}


def input_row_norms(
    config: ModelConfig, params: dict, points: Iterable[str]
) -> dict[str, np.ndarray]:
    """`{point: [L, width]}`: `n_i`, the L2 norm of input channel i's weights in the
    matrices the point feeds (kernels stored `[in, out]`: row i), float32.

    Where one input feeds several matrices (q/k/v; gate/up) `n_i` is the norm of row i
    of their concatenation along the output axis, `sqrt(sum_M ||M[i, :]||^2)`: the norm
    of what channel i adds to all their outputs together. q_in and kv_in share it (one
    input, one threshold, so q/k/v can stay one fused matmul).
    """
    table = _POINT_MATRICES["opt" if config.family == "opt" else "llama"]
    out = {}
    for p in points:
        if p not in table:
            raise ValueError(f"no weight norms for point {p!r} (known: {sorted(table)})")
        rows = []
        for i in range(config.num_layers):
            layer = params[f"layers_{i}"]
            sq = sum(
                np.sum(np.square(np.asarray(layer[mod][proj]["kernel"], np.float32)), axis=1)
                for mod, proj in table[p]
            )
            rows.append(np.sqrt(sq).astype(np.float32))
        out[p] = np.stack(rows)
    return out


Batch = tuple[np.ndarray, np.ndarray]  # tokens [B, T] int32, valid [B, T] bool


def make_stats_fn(
    config: ModelConfig,
    bins: LogBins,
    points: Iterable[str],
    mean_u: bool,
    importance: bool,
    weighted_points: Iterable[str] = (),
) -> Callable:
    """A jit-compiled `f(params, tokens, valid, mean_abs_u, norms) -> dict of per-batch
    statistics`.

    Outputs: `hist/<point>` [L, size] int32, `sum_abs_u` [L, m] float32, `importance`
    [L, size] int32, `whist/<point>` [L, size] int32 of `abs(x) * norms[point]`, and
    `count` (valid tokens). The logits are not used, so XLA drops the output projection.
    """
    import jax
    import jax.numpy as jnp

    from jaxsparse.models import build_model

    model = build_model(config)
    points = tuple(sorted(points))
    for p in points:
        if p not in rules.TENSORS:
            raise ValueError(f"unknown sparsification point {p!r}")
    weighted_points = tuple(sorted(weighted_points))
    has_up = config.family != "opt"

    def stats(params, tokens_BxT, valid_BxT, mean_abs_u_LxM, norms=None):
        taps = dense_taps(model, params, tokens_BxT, valid_BxT)
        out = {}
        for p in points:
            out[f"hist/{p}"] = jnp.stack(
                [
                    bins.histogram(jnp.abs(tap(taps, i, p)), valid_BxT)
                    for i in range(config.num_layers)
                ]
            )
        w = valid_BxT.astype(jnp.float32)[..., None]
        if mean_u and has_up:
            out["sum_abs_u"] = jnp.stack(
                [
                    jnp.sum(jnp.abs(tap(taps, i, "up").astype(jnp.float32)) * w, axis=(0, 1))
                    for i in range(config.num_layers)
                ]
            )
        if importance:
            hists = []
            for i in range(config.num_layers):
                g = jnp.abs(tap(taps, i, "gate").astype(jnp.float32))
                hists.append(bins.histogram(g * mean_abs_u_LxM[i], valid_BxT))
            out["importance"] = jnp.stack(hists)
        for p in weighted_points:
            out[f"whist/{p}"] = jnp.stack(
                [
                    bins.histogram(
                        jnp.abs(tap(taps, i, p).astype(jnp.float32)) * norms[p][i], valid_BxT
                    )
                    for i in range(config.num_layers)
                ]
            )
        out["count"] = jnp.sum(valid_BxT.astype(jnp.int32))
        return out

    return jax.jit(stats)


def collect_statistics(
    config: ModelConfig,
    params: dict,
    batches: Callable[[], Iterator[Batch]],
    requirements: Requirements,
    bins: LogBins = LogBins(),
    num_batches: int | None = None,
    put_batch: Callable[[np.ndarray], object] | None = None,
    progress: bool = True,
) -> CalibrationStats:
    """Streams the calibration batches through the dense model into `CalibrationStats`.

    `batches()` returns a fresh iterator (called once per pass; two passes when the
    importance histogram is needed). `put_batch` places a host array on the devices
    (data-parallel sharding); default: `jnp.asarray`.
    """
    import jax.numpy as jnp
    from tqdm import tqdm

    put = put_batch or jnp.asarray
    L, m = config.num_layers, config.intermediate_size
    stats = CalibrationStats(bins=bins, num_layers=L, tokens=0)
    need_mean_u = requirements.importance
    has_up = config.family != "opt"
    passes = [("statistics", set(requirements.points), need_mean_u, False)]
    if requirements.importance:
        passes.append(("chess importance", set(), False, True))
    mean_abs_u = np.ones((L, m), np.float32)
    wpoints = sorted(requirements.weighted_points)
    if wpoints:
        stats.row_norms = input_row_norms(config, params, wpoints)
    norms_dev = {p: jnp.asarray(v) for p, v in stats.row_norms.items()}
    for label, points, mean_u, importance in passes:
        wp = wpoints if label == "statistics" else []
        fn = make_stats_fn(config, bins, points, mean_u, importance, wp)
        hist = {p: np.zeros((L, bins.size), np.int64) for p in points}
        whist = {p: np.zeros((L, bins.size), np.int64) for p in wp}
        imp = np.zeros((L, bins.size), np.int64)
        sum_u = np.zeros((L, m), np.float64)
        tokens = 0
        mean_dev = jnp.asarray(mean_abs_u if importance else np.zeros((L, 1), np.float32))
        for tokens_BxT, valid_BxT in tqdm(
            batches(),
            total=num_batches,
            disable=not progress,
            desc=f"calibration: {label}",
            unit="batch",
        ):
            out = fn(params, put(tokens_BxT), put(valid_BxT), mean_dev, norms_dev)
            out = {k: np.asarray(v) for k, v in out.items()}
            for p in points:
                hist[p] += out[f"hist/{p}"]
            for p in wp:
                whist[p] += out[f"whist/{p}"]
            if "sum_abs_u" in out:
                sum_u += out["sum_abs_u"]
            if importance:
                imp += out["importance"]
            tokens += int(out["count"])
        if tokens == 0:
            raise ValueError("no calibration tokens")
        if label == "statistics":
            stats.tokens = tokens
            stats.hist.update(hist)
            stats.weighted_hist.update(whist)
            if mean_u:
                mean_abs_u = (sum_u / tokens).astype(np.float32) if has_up else mean_abs_u
                stats.mean_abs_u = mean_abs_u
        else:
            stats.importance_hist = imp
    return stats


def collect_block_inputs(
    config: ModelConfig, params: dict, tokens_BxT: np.ndarray, valid_BxT: np.ndarray
) -> list[np.ndarray]:
    """The residual entering each block of the dense model, [B, T, D] per layer (host)."""
    import jax
    import jax.numpy as jnp

    from jaxsparse.models import build_model

    model = build_model(config)

    @jax.jit
    def run(params, tokens, valid):
        taps = dense_taps(model, params, tokens, valid)
        return [tap(taps, i, "block_in") for i in range(config.num_layers)]

    return [np.asarray(x) for x in run(params, jnp.asarray(tokens_BxT), jnp.asarray(valid_BxT))]
