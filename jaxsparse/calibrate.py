"""Calibration: fit threshold methods on text and write their sparsity states.

`calibrate(...)` packs the calibration text into sequences, streams them through the
dense model once (twice for chess/chess+, see `jaxsparse.methods.statistics`), and fits
every requested method at every requested sparsity from the same statistics, returning
`{(method, sparsity): SparsityState}`; `gather(...)` returns the statistics alone
(`Calibration`), whose `fit(method, sparsity)` makes a state at any sparsity (the
equal-budget sweep solves each method's sparsity that way). `jaxsparse calibrate`
(`jaxsparse.cli.calibrate`) writes one state directory. Without `--data` it uses the `calibration` split of the built-in corpus
(`jaxsparse.data`), disjoint from the split `jaxsparse eval` uses.
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from typing import Any

import numpy as np

DEFAULTS = {"tokens": 16384, "seq_len": 512, "batch_size": 8}


def sequence_batches(seqs_NxT: np.ndarray, batch_size: int, mesh=None):
    """(make_iterator, num_batches): [B, T] token/valid batches, the last padded with
    invalid rows (valid = False) to the full batch size so that one compile serves all.
    B is `batch_size`, or fewer when every row fits in fewer (`sharding.rows_per_batch`)."""
    from jaxsparse.sharding import rows_per_batch

    n = len(seqs_NxT)
    batch_size = rows_per_batch(n, batch_size, mesh)
    num = -(-n // batch_size)

    def batches():
        for start in range(0, n, batch_size):
            rows = seqs_NxT[start : start + batch_size]
            valid = np.ones(rows.shape, bool)
            if len(rows) < batch_size:
                pad = batch_size - len(rows)
                rows = np.concatenate([rows, np.zeros((pad, rows.shape[1]), rows.dtype)])
                valid = np.concatenate([valid, np.zeros((pad, rows.shape[1]), bool)])
            yield rows, valid

    return batches, num


@dataclasses.dataclass
class Calibration:
    """Statistics gathered once, from which `fit` makes a state at any sparsity."""

    config: Any
    modules: dict[str, Any]
    options: dict[str, dict]
    stats: Any
    context: dict | None
    provenance: dict[str, Any]
    seqs: np.ndarray  # the calibration token rows [N, seq_len]
    t0: float

    def fit(self, method: str, sparsity: float):
        """The `SparsityState` of `method` at `sparsity` (cheap: quantiles of the stored
        histograms; teal/wina greedy runs its block search)."""
        from jaxsparse.methods import check_sparsity
        from jaxsparse.sparsity import make_state

        s = check_sparsity(sparsity)
        values, details = self.modules[method].fit(
            self.stats, s, self.options.get(method), self.context
        )
        details = {**details, "options": self.options.get(method) or {}}
        prov = {**self.provenance, "statistics_seconds": round(time.time() - self.t0, 1)}
        return make_state(self.config, method, s, values, prov, details)


def gather(
    config,
    params: dict,
    tokenizer,
    methods: list[str],
    data: list[str] | None = None,
    tokens: int = DEFAULTS["tokens"],
    seq_len: int = DEFAULTS["seq_len"],
    batch_size: int = DEFAULTS["batch_size"],
    options: dict[str, dict] | None = None,
    mesh=None,
    model_source: str = "",
    progress: bool = True,
    bins=None,
) -> Calibration:
    """Streams the calibration text through the dense model once (twice for chess) and
    returns the statistics every method in `methods` is fitted from. `mesh` as in
    `jaxsparse.evaluate.Evaluator` (None: every local device on `data`)."""
    import jax

    from jaxsparse import data as data_mod
    from jaxsparse import sharding
    from jaxsparse.methods import get_method
    from jaxsparse.methods.statistics import (
        LogBins,
        Requirements,
        collect_block_inputs,
        collect_statistics,
    )
    from jaxsparse.models import logical_axes

    modules = {m: get_method(m) for m in methods}
    options = options or {}
    if tokens < 1:
        raise ValueError(f"--tokens {tokens}: must be positive")
    req = Requirements()
    for name, mod in modules.items():
        req = req | mod.requirements(options.get(name))
    bins = bins or LogBins()

    _, seqs = data_mod.token_rows(data, "calibration", config, tokenizer, seq_len, tokens)

    mesh = sharding.as_mesh(mesh)
    batch_size = sharding.round_batch(batch_size, mesh)
    params = sharding.shard_params(params, logical_axes(config), mesh)
    batches, num_batches = sequence_batches(seqs, batch_size, mesh)
    t0 = time.time()
    stats = collect_statistics(
        config,
        params,
        batches,
        req,
        bins,
        num_batches,
        put_batch=lambda x: sharding.put_batch(x, mesh),
        progress=progress,
    )
    context = None
    if req.block_inputs:
        greedy_tokens = max(int((options.get(m) or {}).get("greedy_tokens", 1024)) for m in modules)
        rows = max(1, min(len(seqs), -(-greedy_tokens // seq_len)))
        valid = np.ones((rows, seq_len), bool)
        context = {
            "config": config,
            "params": params,
            "valid": valid,
            "progress": progress,
            "block_inputs": collect_block_inputs(config, params, seqs[:rows], valid),
        }
    provenance = {
        "data": list(map(str, data)) if data else None,
        "builtin_corpus": None if data else data_mod.builtin_provenance("calibration"),
        "tokens": stats.tokens,
        "seq_len": seq_len,
        "sequences": len(seqs),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "jax_version": jax.__version__,
        "model_source": model_source,
        "histogram": {
            "lo": bins.lo,
            "hi": bins.hi,
            "bins": bins.num,
            "relative_resolution": bins.ratio - 1,
        },
    }
    return Calibration(config, modules, options, stats, context, provenance, seqs, t0)


def calibrate(
    config,
    params: dict,
    tokenizer,
    methods: list[str],
    sparsities: list[float],
    data: list[str] | None = None,
    tokens: int = DEFAULTS["tokens"],
    seq_len: int = DEFAULTS["seq_len"],
    batch_size: int = DEFAULTS["batch_size"],
    options: dict[str, dict] | None = None,
    mesh=None,
    model_source: str = "",
    progress: bool = True,
    bins=None,
) -> dict[tuple[str, float], Any]:
    """Fits each method at each sparsity; returns `{(method, sparsity): SparsityState}`.

    `options` maps a method name to its options (e.g. `{"teal": {"allocation": "greedy"}}`).
    Raises ValueError for an unknown method or a sparsity outside [0, 1), and
    `jaxsparse.data.DataError` for empty or too-short data.
    """
    from jaxsparse.methods import check_sparsity, get_method

    sparsities = [check_sparsity(s) for s in sparsities]
    for m in methods:
        get_method(m)
    cal = gather(
        config,
        params,
        tokenizer,
        methods,
        data,
        tokens,
        seq_len,
        batch_size,
        options,
        mesh,
        model_source,
        progress,
        bins,
    )
    return {(name, s): cal.fit(name, s) for name in methods for s in sparsities}
