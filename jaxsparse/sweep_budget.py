"""The equal-budget sweep: every method at the same activated-params fractions.

`jaxsparse sweep --fractions 0.5,0.6,0.75 --methods chess,teal,wina --out DIR` gathers the
calibration statistics once (`calibrate.gather`), then for each method and target
fraction `F` solves the method's sparsity knob so that the fraction of the blocks' linear
weights read per token (`jaxsparse.sparsity.activated_params_fraction`), measured on the
first `measure_tokens` calibration tokens by the forward `eval` runs, is `F` within
`tol` (`jaxsparse.budget`: the fraction at a coarse grid of sparsities, then regula falsi
inside the bracketing interval). Deja Vu states given with `--sparsity-state` are
re-pointed the same way (their knob: `ffn_k`, the neurons kept); other states (learned
ones) are evaluated at the fraction they were fitted for. A method that cannot reach `F`
(chess reads at least the attention and gate_proj weights) gets a row saying so.

Writes `DIR/states/<method>_f<F>/`, `DIR/results/<name>.json` (`jaxsparse eval` results on
the evaluation split, each with the solved knob and the calibration fraction),
`DIR/table.md`, `DIR/table.json` and `DIR/ppl_vs_fraction.png`. An interrupted sweep
reuses what it wrote.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

GRID = (0.25, 0.5, 0.75, 0.95)
COLUMNS = (
    "method",
    "target_fraction",
    "knob",
    "calibration_fraction",
    "activated_params_fraction",
    "perplexity",
    "ppl_vs_first",
    "acc",
    "acc_norm",
)


def fraction_name(method: str, fraction: float, suffix: str = "") -> str:
    return f"{method.replace('+', '_plus')}_f{fraction:g}{suffix}"


def solve_sparsity(fit, meter, target: float, tol: float, grid=GRID) -> tuple[float, float, list]:
    """The sparsity `s` of `fit(s)` (a state) whose measured fraction is `target`; returns
    (s, fraction, trace of (s, fraction)). Raises `budget.BudgetError` when out of reach."""
    from jaxsparse.budget import BudgetError, solve_decreasing

    cache: dict[float, float] = {}
    trace: list = []

    def f(s):
        s = float(s)
        if s not in cache:
            cache[s] = meter(fit(s).thresholds_for_model())
            trace.append((s, cache[s]))
        return cache[s]

    points = [0.0, *grid]
    values = [f(s) for s in points]
    for (a, fa), (b, fb) in zip(zip(points, values), zip(points[1:], values[1:])):
        if fb <= target <= fa:
            s, v = solve_decreasing(f, target, a, b, tol, fa=fa, fb=fb)
            return s, v, trace
    raise BudgetError(
        f"target fraction {target} is out of reach: sparsities 0 to {grid[-1]} "
        f"give fractions {values[0]:.4f} to {values[-1]:.4f}"
    )


def solve_dejavu(state, meter, target: float, tol: float) -> tuple[Any, float, list]:
    """The dejavu state re-pointed to the `ffn_k` (neurons kept) whose measured fraction
    is closest to `target`; returns (state, fraction, trace of (ffn_k, fraction))."""
    from jaxsparse.budget import BudgetError, solve_decreasing
    from jaxsparse.predictors import with_operating_point

    m = state.meta.model.intermediate_size
    trace: list = []
    cache: dict[int, float] = {}

    def f_k(k):
        k = int(min(max(round(k), 1), m))
        if k not in cache:
            cache[k] = meter(with_operating_point(state, ffn_k=k).thresholds_for_model())
            trace.append((k, cache[k]))
        return cache[k]

    try:  # x = 1 - k / m, so the fraction falls with x
        x, _ = solve_decreasing(
            lambda x: f_k(m * (1 - x)), target, 0.0, 1.0 - 1.0 / m, max(tol, 0.5 / m)
        )
    except BudgetError as e:
        raise BudgetError(f"dejavu: {e} (ffn_k from {m} to 1)") from None
    k = int(min(max(round(m * (1 - x)), 1), m))
    # the nearest integer on either side
    best = min(
        (kk for kk in (k - 1, k, k + 1) if 1 <= kk <= m), key=lambda kk: abs(f_k(kk) - target)
    )
    return with_operating_point(state, ffn_k=best), f_k(best), trace


def table_row(result: dict[str, Any]) -> dict[str, Any]:
    tasks = result.get("tasks") or {}
    b = result.get("budget", {})
    return {
        "method": result["method"],
        "target_fraction": b.get("target_fraction"),
        "knob": b.get("knob"),
        "calibration_fraction": b.get("calibration_fraction"),
        "activated_params_fraction": result.get("activated_params_fraction"),
        "perplexity": result.get("perplexity"),
        "acc": tasks.get("acc"),
        "acc_norm": tasks.get("acc_norm"),
        "note": b.get("note"),
    }


def sweep_fractions(
    lm,
    methods: list[str],
    fractions: list[float],
    out: str | Path,
    data: list[str] | None = None,
    calib: dict | None = None,
    ev: dict | None = None,
    options: dict | None = None,
    extra_states: list[str] | None = None,
    include_dense: bool = True,
    measure_tokens: int = 2048,
    tol: float = 2e-3,
    progress: bool = True,
    mesh=None,
) -> list[dict]:
    """Runs the equal-budget sweep for a loaded model; returns the result dicts (dense
    first; an unreachable (method, fraction) is a result without perplexity, with a
    note). `mesh`: the devices of calibration and evaluation, as in
    `jaxsparse.evaluate.Evaluator`."""
    from jaxsparse.budget import BudgetError, FractionMeter
    from jaxsparse.calibrate import DEFAULTS as CAL
    from jaxsparse.calibrate import gather
    from jaxsparse.evaluate import DEFAULTS as EV
    from jaxsparse.io import is_complete
    from jaxsparse.methods import get_method
    from jaxsparse.sparsity import load_state, save_state
    from jaxsparse.sweep import ResultCache, paired_to_first, plot_ppl_vs_activated, write_table

    for m in methods:
        get_method(m)
    for f in fractions:
        if not 0.0 < f <= 1.0:
            raise ValueError(f"--fractions: {f} is not a fraction of weights read in (0, 1]")
    calib = {**CAL, **(calib or {})}
    ev = {**EV, "ppl": None, "tasks": None, **(ev or {})}
    out = Path(out)
    (out / "states").mkdir(parents=True, exist_ok=True)
    (out / "results").mkdir(parents=True, exist_ok=True)
    config = lm.config
    extras = [(d, load_state(d, config)) for d in extra_states or []]

    # 1. knobs solved on calibration text
    todo: list[tuple[str, Any, dict]] = []  # (name, state or None, budget info)
    cal = meter = None
    for m in methods:
        for f in fractions:
            name = fraction_name(m, f)
            path = out / "states" / name
            if is_complete(path):
                st = load_state(path, config)
                b = st.meta.details.get("budget", {})
                if b.get("target_fraction") == f and b.get("tol") == tol:
                    todo.append((name, st, b))
                    continue
            if cal is None:
                cal = gather(
                    config,
                    lm.params,
                    lm.tokenizer,
                    methods,
                    data,
                    calib["tokens"],
                    calib["seq_len"],
                    calib["batch_size"],
                    options,
                    mesh=mesh,
                    model_source=lm.source,
                    progress=progress,
                )
                rows = max(1, min(len(cal.seqs), -(-measure_tokens // cal.seqs.shape[1])))
                meter = FractionMeter(config, lm.params, cal.seqs[:rows])
            t0 = time.time()
            try:
                s, frac, trace = solve_sparsity(lambda s, m=m, c=cal: c.fit(m, s), meter, f, tol)
            except BudgetError as e:
                todo.append(
                    (name, None, {"target_fraction": f, "note": "out of reach", "error": str(e)})
                )
                print(f"{name}: {e}", file=sys.stderr)
                continue
            b = {
                "target_fraction": f,
                "knob": round(s, 6),
                "knob_name": "sparsity",
                "calibration_fraction": frac,
                "tol": tol,
                "trace": trace,
                "measure_tokens": int(meter.seqs.size),
                "seconds": round(time.time() - t0, 1),
            }
            st = cal.fit(m, s)
            st = _with_details(st, {"budget": b})
            save_state(st, path, overwrite=True)
            print(f"{name}: sparsity {s:.4f} reads {frac:.4f} on calibration text")
            todo.append((name, st, b))
    for d, st in extras:
        if st.method == "dejavu":
            for f in fractions:
                name = fraction_name("dejavu", f, f"_{Path(d).name}")
                if meter is None:
                    seqs = _calibration_rows(config, lm.tokenizer, data, calib, measure_tokens)
                    meter = FractionMeter(config, lm.params, seqs)
                try:
                    st_f, frac, trace = solve_dejavu(st, meter, f, tol)
                except BudgetError as e:
                    todo.append(
                        (
                            name,
                            None,
                            {"target_fraction": f, "note": "out of reach", "error": str(e)},
                        )
                    )
                    continue
                k = int(st_f.predictors["layers_0"]["ffn_k"])
                todo.append(
                    (
                        name,
                        st_f,
                        {
                            "target_fraction": f,
                            "knob": k,
                            "knob_name": "ffn_k",
                            "calibration_fraction": frac,
                            "trace": trace,
                        },
                    )
                )
        else:
            todo.append(
                (
                    f"{st.method}_{Path(d).name}",
                    st,
                    {
                        "target_fraction": st.meta.details.get("settings", {}).get(
                            "target_fraction"
                        ),
                        "knob": None,
                        "state": str(d),
                    },
                )
            )

    # 2. evaluation on the evaluation split
    cache = ResultCache(out, config, lm, ev, mesh, progress, digits=4)
    results = []
    for name, st, b in (
        [("dense", None, {"target_fraction": 1.0})] if include_dense else []
    ) + todo:
        if st is None and name != "dense":
            results.append(
                {"method": name.rsplit("_f", 1)[0], "budget": b, "activated_params_fraction": None}
            )
        else:
            results.append(cache.result(name, st, {"budget": b}))
    rows = [table_row(r) for r in results]
    paired_to_first(rows, results, lambda r: (r.get("budget") or {}).get("target_fraction"))
    write_table(rows, out, COLUMNS)
    plot_ppl_vs_activated(
        [r for r in results if r.get("perplexity") is not None],
        out / "ppl_vs_fraction.png",
        f"{Path(lm.source).name}: equal activated-params fractions "
        f"{', '.join(f'{f:g}' for f in fractions)}",
    )
    return results


def _with_details(state, extra: dict):
    import dataclasses

    details = {**state.meta.details, **extra}
    meta = dataclasses.replace(state.meta, details_json=json.dumps(details, sort_keys=True))
    return state.replace(meta=meta)


def _calibration_rows(config, tokenizer, data, calib: dict, measure_tokens: int):
    from jaxsparse import data as data_mod

    _, rows = data_mod.token_rows(
        data,
        "calibration",
        config,
        tokenizer,
        calib["seq_len"],
        min(measure_tokens, calib["tokens"]),
    )
    return rows
