"""Sweep: calibrate and evaluate every method x sparsity, then tabulate and plot.

`jaxsparse sweep --methods cats,chess --sparsities 0.3,0.5 --out DIR` writes

  DIR/states/<method>_s<S>/     the sparsity states (reused when present and valid)
  DIR/results/<name>.json       one `jaxsparse eval` result each, plus `dense.json`
                                (reused when present with the same evaluation settings)
  DIR/table.md, DIR/table.json  perplexity, task acc/acc_norm, measured FFN sparsity,
                                activated-parameter fraction, one row per configuration
  DIR/ppl_vs_activated.png      perplexity against the fraction of linear weights read
  DIR/sparsity_heatmap.png      per-layer fraction of linear weights skipped

  DIR/settings.json             the settings the states and results were made with

Missing states are calibrated together: the statistics are gathered once for all of
them (`--calibrate-only` stops there). An interrupted sweep resumes from the states and
results already written, and a rerun with more methods or sparsities adds to them; a
rerun with other settings (model, dtype, data and its content, token counts, options,
evaluation settings) is refused with the differences named (`SweepSettingsError`), unless
`overwrite` replaces what the sweep wrote. A result is also reused only if it was made
from the very state now in DIR/states (a fingerprint of its metadata).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

TABLE_COLUMNS = (
    "method",
    "target_sparsity",
    "perplexity",
    "acc",
    "acc_norm",
    "ffn_sparsity",
    "activated_params_fraction",
)
# A sweep's own table: each method's perplexity against the first's at the same sparsity
# beside it (`paired_to_first`).
SWEEP_COLUMNS = (
    *TABLE_COLUMNS[: TABLE_COLUMNS.index("perplexity") + 1],
    "ppl_vs_first",
    *TABLE_COLUMNS[TABLE_COLUMNS.index("perplexity") + 1 :],
)


def config_name(method: str, sparsity: float) -> str:
    return f"{method.replace('+', '_plus')}_s{sparsity:g}"


SETTINGS_JSON = "settings.json"
# What a sweep writes into its --out (all that `overwrite` removes).
OUTPUTS = (
    "states",
    "results",
    "table.md",
    "table.json",
    "ppl_vs_activated.png",
    "sparsity_heatmap.png",
    SETTINGS_JSON,
)


class SweepSettingsError(ValueError):
    """--out holds states or results made with other settings."""


def _files_key(paths) -> list[dict] | str | None:
    """Paths with a digest of their content, so that an edited file counts as a change."""
    import hashlib

    if not paths:
        return None
    if isinstance(paths, str | Path):
        paths = [paths]
    out = []
    for p in map(Path, paths):
        digest = hashlib.sha256(p.read_bytes()).hexdigest()[:16] if p.is_file() else None
        out.append({"path": str(p), "sha256": digest})
    return out


def sweep_settings(
    model: str, dtype: str, data: list[str] | None, calib: dict, options: dict | None, ev: dict
) -> dict[str, dict]:
    """The settings a sweep's states ("calibration") and results ("evaluation") depend on."""
    from jaxsparse.data import builtin_provenance

    builtin_eval = not ev["ppl"] and not ev["tasks"]
    calibration = {
        "model": model,
        "dtype": dtype,
        "data": _files_key(data) or builtin_provenance("calibration"),
        "tokens": calib["tokens"],
        "seq_len": calib["seq_len"],
        "batch_size": calib["batch_size"],
        "options": options or {},
    }
    evaluation = {
        "model": model,
        "dtype": dtype,
        "ppl": _files_key(ev["ppl"]),
        "tasks": _files_key(ev["tasks"]),
        "num_tasks": ev["num_tasks"],
        "max_tokens": ev["max_tokens"],
        "seq_len": ev["seq_len"],
        "batch_size": ev["batch_size"],
        "builtin": builtin_provenance("evaluation") if builtin_eval else None,
    }
    return {"calibration": calibration, "evaluation": evaluation}


def check_out_dir(
    out: str | Path,
    settings: dict[str, dict],
    calibrate_only: bool = False,
    ignore: tuple[str, ...] = (),
) -> None:
    """Raises SweepSettingsError if `out` holds a sweep made with settings other than
    `settings` (for "calibration", and "evaluation" unless `calibrate_only`; keys in
    `ignore` are not compared), or states and results without a settings file."""
    out = Path(out)
    fix = "pass --overwrite to replace its states and results, or give another --out"
    path = out / SETTINGS_JSON
    if not path.is_file():
        if any((out / d).is_dir() and any((out / d).iterdir()) for d in ("states", "results")):
            raise SweepSettingsError(
                f"{out} holds states or results but no {SETTINGS_JSON} "
                f"(an older sweep): they may come from other settings; "
                f"{fix}"
            )
        return
    try:
        stored = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SweepSettingsError(f"{path}: not valid JSON ({e}); {fix}") from None
    diffs = []
    for part in ("calibration",) if calibrate_only else ("calibration", "evaluation"):
        old, new = stored.get(part), settings[part]
        if old is None:
            continue
        for k in sorted(set(old) | set(new)):
            if k not in ignore and old.get(k) != new.get(k):
                diffs.append(f"{part} {k}: {old.get(k)!r} there, {new.get(k)!r} now")
    if diffs:
        raise SweepSettingsError(
            f"{out} holds a sweep made with other settings ({'; '.join(diffs)}); {fix}"
        )


def remove_outputs(out: str | Path) -> None:
    """Removes what a sweep wrote into `out` (only those names)."""
    import shutil

    for name in OUTPUTS:
        p = Path(out) / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def state_fingerprint(state) -> str | None:
    """A digest of a state's metadata (method, sparsity, model, provenance with its date,
    details): two fits never share one."""
    import hashlib

    if state is None:
        return None
    doc = json.dumps(state.meta.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


def _reusable_state(path: Path, config, method: str, s: float, options: dict | None):
    from jaxsparse.io import is_complete
    from jaxsparse.sparsity import StateError, load_state

    if not is_complete(path):
        return None
    try:
        state = load_state(path, config)
    except StateError as e:
        print(f"not reusing {path}: {e}", file=sys.stderr)
        return None
    if state.method != method or abs(state.target_sparsity - s) > 1e-9:
        return None
    if state.meta.details.get("options", {}) != (options or {}).get(method, {}):
        print(f"not reusing {path}: fitted with other options", file=sys.stderr)
        return None
    return state


def table_row(result: dict[str, Any]) -> dict[str, Any]:
    """One table row. `ffn_sparsity` (the measured zero fraction of the FFN gate) is None,
    shown as "—", for a method that does not threshold the gate (teal: its FFN sparsity is
    in the inputs of the projections, `activated_params_fraction` counts it)."""
    tasks = result.get("tasks") or {}
    ffn = result["measured_sparsity"]["ffn"]
    return {
        "method": result["method"],
        "target_sparsity": result["target_sparsity"],
        "perplexity": result.get("perplexity"),
        "acc": tasks.get("acc"),
        "acc_norm": tasks.get("acc_norm"),
        "ffn_sparsity": ffn if ffn > 0 or result["method"] == "dense" else None,
        "activated_params_fraction": result["activated_params_fraction"],
    }


def paired_to_first(rows: list[dict[str, Any]], results: list[dict[str, Any]], group) -> None:
    """Sets each table row's "ppl_vs_first" (rows[i] made from results[i]): its result's
    perplexity minus that of the first result in the same `group` (`group(result)`: the
    target sparsity, or fraction), with a 95% interval from resampling the windows of
    both together (`jaxsparse.evaluate.paired_difference`), as "+0.18 [-0.10, +0.45] vs
    teal"; None for the first of its group, dense, a result without perplexity, or one
    made before results kept their windows. At 50% sparsity on SmolLM2, differences of a
    few tenths on 8192 tokens were noise
    (benchmarks/results/smollm2_cpu_wina/paired/README.md)."""
    from jaxsparse.evaluate import paired_difference

    first: dict[Any, dict[str, Any]] = {}
    for row, r in zip(rows, results, strict=True):
        row["ppl_vs_first"] = None
        g = group(r)
        if r.get("perplexity") is None or r["method"] == "dense" or g is None:
            continue
        ref = first.setdefault(g, r)
        if ref is r or "window_nll" not in r or "window_nll" not in ref:
            continue
        d = paired_difference(ref, r)
        lo, hi = d["interval95"]
        row["ppl_vs_first"] = f"{d['ppl_b_minus_a']:+.3f} [{lo:+.3f}, {hi:+.3f}] vs {ref['method']}"


def markdown_table(rows: list[dict[str, Any]], columns=TABLE_COLUMNS) -> str:
    """A Markdown table of `rows` (dicts) over `columns`: floats to 4 significant digits,
    None as "—"; a row's "note", if any, is appended to its last cell."""

    def fmt(v):
        if v is None:
            return "—"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |\n", "|" + "---|" * len(columns) + "\n"]
    for r in rows:
        cells = [fmt(r.get(c)) for c in columns]
        if r.get("note"):
            cells[-1] = f"{cells[-1]} ({r['note']})"
        lines.append("| " + " | ".join(cells) + " |\n")
    return "".join(lines)


def open_evaluator(config, lm, ev: dict, mesh, progress: bool):
    """`(Evaluator, perplexity token ids or None, tasks or None)` for a sweep's evaluation
    settings `ev` (no `ppl` and no `tasks` file: the built-in splits). Sweeps call it on
    first need, so that a sweep whose results are all reused loads no data."""
    from jaxsparse import data as data_mod
    from jaxsparse.evaluate import Evaluator, ppl_token_ids

    builtin = not ev["ppl"] and not ev["tasks"]
    if ev["tasks"]:
        tasks = data_mod.read_tasks(ev["tasks"])
    else:
        tasks = data_mod.builtin_tasks(ev["num_tasks"]) if builtin else None
    ppl = None
    if ev["ppl"] or builtin:
        ppl = ppl_token_ids(config, lm.tokenizer, ev["ppl"], ev["max_tokens"] or None)
    evaluator = Evaluator(
        config,
        lm.params,
        lm.tokenizer,
        ev["seq_len"],
        ev["batch_size"],
        mesh=mesh,
        progress=progress,
    )
    return evaluator, ppl, tasks


def eval_settings(ev: dict, source: str) -> dict:
    """What a sweep's result depends on besides its state: the evaluation settings `ev`
    and the model's source."""
    return {
        "seq_len": ev["seq_len"],
        "max_tokens": ev["max_tokens"],
        "ppl": ev["ppl"],
        "tasks": ev["tasks"],
        "num_tasks": ev["num_tasks"],
        "model": source,
    }


class ResultCache:
    """The evaluations of a sweep in `out/results/<name>.json`, reused when they were made
    with the same settings (`eval_settings`) and hold the same `key` items (the state's
    fingerprint, or its budget); the Evaluator opens on first need (`open_evaluator`), so
    that a sweep whose results are all reused loads no data. `digits`: of the activated
    fraction printed."""

    def __init__(self, out: Path, config, lm, ev: dict, mesh, progress: bool, digits: int = 3):
        self.out, self.config, self.lm, self.ev = out, config, lm, ev
        self.mesh, self.progress, self.digits = mesh, progress, digits
        self.settings = eval_settings(ev, lm.source)
        self.evaluator = self.ppl = self.tasks = None

    def result(self, name: str, state, key: dict) -> dict:
        from jaxsparse.io import write_json_atomic

        path = self.out / "results" / f"{name}.json"
        if path.is_file():
            old = json.loads(path.read_text())
            if old.get("sweep_settings") == self.settings and all(
                old.get(k) == v for k, v in key.items()
            ):
                return old
        if self.evaluator is None:
            self.evaluator, self.ppl, self.tasks = open_evaluator(
                self.config, self.lm, self.ev, self.mesh, self.progress
            )
        t0 = time.time()
        r = self.evaluator.evaluate(state, self.ppl, self.tasks)
        r.update({"sweep_settings": self.settings, **key, "model_source": self.lm.source})
        write_json_atomic(r, path)
        print(
            f"{name}: perplexity {r.get('perplexity', float('nan')):.3f}, activated "
            f"{r['activated_params_fraction']:.{self.digits}f} ({time.time() - t0:.0f} s)"
        )
        return r


def write_table(rows: list[dict[str, Any]], out: Path, columns=TABLE_COLUMNS) -> None:
    """`out/table.md` (`markdown_table`) and `out/table.json`."""
    from jaxsparse.io import write_json_atomic

    (out / "table.md").write_text(markdown_table(rows, columns))
    write_json_atomic(rows, out / "table.json")


def plot_ppl_vs_activated(results: list[dict], path: Path, title: str) -> None:
    # A bare Figure, not pyplot: no global backend switch (a notebook's plots keep working).
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=120)
    ax = fig.subplots()
    by_method: dict[str, list] = {}
    for r in results:
        if r.get("perplexity") is None:
            continue
        by_method.setdefault(r["method"], []).append(r)
    for method, rs in sorted(by_method.items()):
        rs = sorted(rs, key=lambda r: r["activated_params_fraction"])
        x = [r["activated_params_fraction"] for r in rs]
        y = [r["perplexity"] for r in rs]
        if method == "dense":
            ax.scatter(x, y, marker="*", s=160, color="black", label="dense", zorder=3)
            continue
        ax.plot(x, y, marker="o", label=method)
        for r in rs:
            ax.annotate(
                f"{r['target_sparsity']:g}",
                (r["activated_params_fraction"], r["perplexity"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=8,
            )
    ax.set_xlabel("activated fraction of linear weights per token (blocks only)")
    ax.set_ylabel("perplexity")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def plot_layer_heatmap(results: list[dict], path: Path, title: str) -> None:
    import numpy as np
    from matplotlib.figure import Figure

    rows = [r for r in results if r["method"] != "dense"]
    if not rows:
        return
    labels = [f"{r['method']} {r['target_sparsity']:g}" for r in rows]
    layers = sorted(rows[0]["activated_params_per_layer"], key=lambda k: int(k.split("_")[1]))
    data = np.array([[1.0 - r["activated_params_per_layer"][k] for k in layers] for r in rows])
    fig = Figure(figsize=(max(6, 0.28 * len(layers) + 3), 0.45 * len(rows) + 1.8), dpi=120)
    ax = fig.subplots()
    im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    step = max(1, len(layers) // 16)
    ax.set_xticks(
        range(0, len(layers), step), [str(i) for i in range(0, len(layers), step)], fontsize=8
    )
    ax.set_xlabel("layer")
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            if len(layers) <= 32:
                ax.text(
                    j,
                    i,
                    f"{data[i, j]:.2f}"[1:],
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if data[i, j] < 0.6 else "black",
                )
    fig.colorbar(im, ax=ax, label="fraction of linear weights skipped")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def sweep(
    lm,
    methods: list[str],
    sparsities: list[float],
    out: str | Path,
    data: list[str] | None = None,
    calib: dict | None = None,
    ev: dict | None = None,
    options: dict | None = None,
    include_dense: bool = True,
    progress: bool = True,
    calibrate_only: bool = False,
    extra_states: list[str] | None = None,
    overwrite: bool = False,
    mesh=None,
) -> list[dict]:
    """Runs the sweep for a loaded model (`LoadedModel`-like: config, params, tokenizer,
    source); returns the result dicts (dense first). `extra_states`: directories of
    states fitted elsewhere (`jaxsparse learn`, `train-predictors`), evaluated after the
    calibrated ones. Raises SweepSettingsError if `out` holds a sweep made with other
    settings, unless `overwrite` (which first removes what that sweep wrote). `mesh`: the
    devices of calibration and evaluation, as in `jaxsparse.evaluate.Evaluator`."""
    from jaxsparse.calibrate import DEFAULTS as CAL
    from jaxsparse.calibrate import calibrate
    from jaxsparse.evaluate import DEFAULTS as EV
    from jaxsparse.evaluate import write_json_atomic
    from jaxsparse.methods import check_sparsity, get_method
    from jaxsparse.sparsity import save_state

    sparsities = [check_sparsity(s) for s in sparsities]
    for m in methods:
        get_method(m)
    calib = {**CAL, **(calib or {})}
    ev = {**EV, "ppl": None, "tasks": None, **(ev or {})}
    out = Path(out)
    config = lm.config
    run_settings = sweep_settings(lm.source, config.dtype, data, calib, options, ev)
    if overwrite:
        remove_outputs(out)
    check_out_dir(out, run_settings, calibrate_only)
    stored = {}
    if (out / SETTINGS_JSON).is_file():
        stored = json.loads((out / SETTINGS_JSON).read_text())
    stored["calibration"] = run_settings["calibration"]
    if not calibrate_only:
        stored["evaluation"] = run_settings["evaluation"]
    write_json_atomic(stored, out / SETTINGS_JSON)
    (out / "states").mkdir(parents=True, exist_ok=True)
    (out / "results").mkdir(parents=True, exist_ok=True)

    states, missing = {}, []
    for m in methods:
        for s in sparsities:
            st = _reusable_state(out / "states" / config_name(m, s), config, m, s, options)
            if st is None:
                missing.append((m, s))
            else:
                states[(m, s)] = st
    if missing:
        todo_methods = sorted({m for m, _ in missing}, key=methods.index)
        todo_s = sorted({s for _, s in missing})
        print(f"calibrating {', '.join(todo_methods)} at {', '.join(map(str, todo_s))}")
        fitted = calibrate(
            config,
            lm.params,
            lm.tokenizer,
            todo_methods,
            todo_s,
            data,
            calib["tokens"],
            calib["seq_len"],
            calib["batch_size"],
            options,
            mesh=mesh,
            model_source=lm.source,
            progress=progress,
        )
        for key in missing:
            save_state(fitted[key], out / "states" / config_name(*key), overwrite=True)
            states[key] = fitted[key]

    if calibrate_only:
        return []
    from jaxsparse.sparsity import load_state

    todo = ([("dense", None)] if include_dense else []) + [
        (config_name(m, s), states[(m, s)]) for m in methods for s in sparsities
    ]
    for d in extra_states or []:
        st = load_state(d, config)
        todo.append((f"{config_name(st.method, st.target_sparsity)}_{Path(d).name}", st))
    cache = ResultCache(out, config, lm, ev, mesh, progress)
    results = [
        cache.result(name, state, {"state_fingerprint": state_fingerprint(state)})
        for name, state in todo
    ]
    rows = [table_row(r) for r in results]
    paired_to_first(rows, results, lambda r: r["target_sparsity"])
    write_table(rows, out, SWEEP_COLUMNS)
    title = f"{Path(lm.source).name}: {', '.join(methods)}"
    plot_ppl_vs_activated(results, out / "ppl_vs_activated.png", title)
    plot_layer_heatmap(results, out / "sparsity_heatmap.png", title)
    return results
