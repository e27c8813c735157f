"""Sweep on a tiny model: states, results, table and plots written; a rerun reuses them."""

from __future__ import annotations

import json

import pytest
from tiny import LLAMA, SWEEP_WORDS, ByteTok, Loaded, sweep_corpus, sweep_kwargs

from jaxsparse.cli.sweep import parse_list
from jaxsparse.models import init_params
from jaxsparse.sweep import config_name, markdown_table, sweep


def test_parse_list_and_names():
    assert parse_list("cats, chess+") == ["cats", "chess+"]
    assert parse_list("0.3,0.5", float) == [0.3, 0.5]
    with pytest.raises(ValueError):
        parse_list(" , ")
    assert config_name("chess+", 0.5) == "chess_plus_s0.5"


def test_sweep_writes_table_and_plots_and_resumes(tmp_path):
    from PIL import Image

    _, cal, ev = sweep_corpus(tmp_path, 600)
    (tmp_path / "tasks.jsonl").write_text(
        json.dumps({"context": "alpha beta", "choices": [" gamma", " delta"], "gold": 0}) + "\n"
    )
    lm = Loaded(LLAMA, init_params(LLAMA), ByteTok())
    out = tmp_path / "sweep"
    kw = sweep_kwargs(cal, ev, 1024, str(tmp_path / "tasks.jsonl"))
    results = sweep(lm, ["cats", "chess+"], [0.3, 0.6], out, **kw)
    assert [r["method"] for r in results] == ["dense", "cats", "cats", "chess+", "chess+"]
    for name in ("cats_s0.3", "cats_s0.6", "chess_plus_s0.3", "chess_plus_s0.6"):
        assert (out / "states" / name / "state.json").is_file()
        assert (out / "results" / f"{name}.json").is_file()
    rows = json.loads((out / "table.json").read_text())
    assert len(rows) == 5 and rows[0]["activated_params_fraction"] == pytest.approx(1.0)
    cats = [r for r in rows if r["method"] == "cats"]
    assert cats[0]["ffn_sparsity"] < cats[1]["ffn_sparsity"]
    assert all(r["activated_params_fraction"] < 1 for r in rows[1:])
    md = (out / "table.md").read_text()
    assert md.startswith("| method | target_sparsity | perplexity | ppl_vs_first")
    assert md.count("\n") == 7
    # at each sparsity, chess+ against cats (the first there), paired over windows
    vs = [(r["method"], r["target_sparsity"], r["ppl_vs_first"]) for r in rows]
    assert [v for m, _, v in vs if m in ("dense", "cats")] == [None, None, None]
    by = {(r["method"], r["target_sparsity"]): r for r in results}
    for m, s, v in vs:
        if m == "chess+":
            diff = by[("chess+", s)]["perplexity"] - by[("cats", s)]["perplexity"]
            assert v.startswith(f"{diff:+.3f} [") and v.endswith("vs cats"), v
    for png in ("ppl_vs_activated.png", "sparsity_heatmap.png"):
        with Image.open(out / png) as im:
            assert im.size[0] > 300 and im.size[1] > 200
    # a rerun reuses the states and the results
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.json")}
    again = sweep(lm, ["cats", "chess+"], [0.3, 0.6], out, **kw)
    assert [r["perplexity"] for r in again] == [r["perplexity"] for r in results]
    for p, t in mtimes.items():
        if p.parent.name != "sweep":  # the table is rewritten, the rest kept
            assert p.stat().st_mtime_ns == t, p


def test_table_row_shows_no_ffn_sparsity_for_a_method_that_does_not_threshold_the_gate():
    from jaxsparse.sweep import table_row

    def result(method, gate):
        per_point = {"q_in": 0.5, "gate": gate}
        return {
            "method": method,
            "target_sparsity": 0.5,
            "activated_params_fraction": 0.6,
            "measured_sparsity": {"ffn": gate, "per_point": per_point},
        }

    assert table_row(result("teal", 0.0))["ffn_sparsity"] is None
    assert table_row(result("chess", 0.49))["ffn_sparsity"] == 0.49
    assert table_row(result("dense", 0.0))["ffn_sparsity"] == 0.0


def test_markdown_table_formats_missing_values():
    md = markdown_table(
        [
            {
                "method": "dense",
                "target_sparsity": 0.0,
                "perplexity": 3.14159,
                "acc": None,
                "acc_norm": None,
                "ffn_sparsity": 0.0,
                "activated_params_fraction": 1.0,
            }
        ]
    )
    assert "| dense | 0 | 3.142 | — | — | 0 | 1 |" in md


def test_sweep_refuses_an_out_made_with_other_settings(tmp_path):
    """A rerun into the same --out with other settings names the differences and the fix,
    and reuses nothing; `overwrite` replaces what the earlier sweep wrote."""
    from jaxsparse.sweep import SweepSettingsError

    rng, cal, ev = sweep_corpus(tmp_path, 600)
    lm = Loaded(LLAMA, init_params(LLAMA), ByteTok())
    out = tmp_path / "sweep"
    kw = sweep_kwargs(cal, ev, 512, include_dense=False)
    first = sweep(lm, ["cats"], [0.5], out, **kw)
    stored = json.loads((out / "settings.json").read_text())
    assert stored["calibration"]["tokens"] == 512 and stored["evaluation"]["seq_len"] == 64
    state_json = (out / "states" / "cats_s0.5" / "state.json").read_text()

    # other calibration tokens: refused, nothing touched
    other = {**kw, "calib": {**kw["calib"], "tokens": 1024}}
    with pytest.raises(
        SweepSettingsError,
        match=r"calibration tokens: 512 there, 1024 now.*"
        r"--overwrite.*another --out",
    ):
        sweep(lm, ["cats"], [0.5], out, **other)
    assert (out / "states" / "cats_s0.5" / "state.json").read_text() == state_json
    # the same path with other content is another data set
    cal.write_text(" ".join(rng.choice(SWEEP_WORDS, 600)))
    with pytest.raises(SweepSettingsError, match="calibration data"):
        sweep(lm, ["cats"], [0.5], out, **kw)
    # other evaluation settings: refused too, but --calibrate-only only compares calibration
    with pytest.raises(SweepSettingsError, match="evaluation seq_len: 64 there, 32 now"):
        sweep(
            lm,
            ["cats"],
            [0.5],
            out,
            **{**other, "calib": kw["calib"], "ev": {**kw["ev"], "seq_len": 32}},
        )
    # overwrite: recalibrated on the new settings, new results
    again = sweep(lm, ["cats"], [0.5], out, **other, overwrite=True)
    assert json.loads((out / "settings.json").read_text())["calibration"]["tokens"] == 1024
    assert (out / "states" / "cats_s0.5" / "state.json").read_text() != state_json
    assert again[0]["state_fingerprint"] != first[0]["state_fingerprint"]


def test_sweep_refuses_states_without_settings(tmp_path):
    from jaxsparse.sweep import SweepSettingsError, check_out_dir

    (tmp_path / "states" / "cats_s0.5").mkdir(parents=True)
    with pytest.raises(SweepSettingsError, match="no settings.json"):
        check_out_dir(tmp_path, {"calibration": {}, "evaluation": {}})
    check_out_dir(tmp_path / "new", {"calibration": {}, "evaluation": {}})  # empty: fine


def test_sweep_does_not_reuse_a_result_of_another_state(tmp_path):
    """A result is reused only for the very state it was made from (its fingerprint)."""
    _, cal, ev = sweep_corpus(tmp_path, 600, seed=1)
    lm = Loaded(LLAMA, init_params(LLAMA), ByteTok())
    out = tmp_path / "sweep"
    kw = sweep_kwargs(cal, ev, 512, include_dense=False)
    sweep(lm, ["cats"], [0.5], out, **kw)
    result = out / "results" / "cats_s0.5.json"
    doc = json.loads(result.read_text())
    doc["perplexity"] = -1.0  # a stale result, marked
    doc["state_fingerprint"] = "0" * 16
    result.write_text(json.dumps(doc))
    again = sweep(lm, ["cats"], [0.5], out, **kw)
    assert again[0]["perplexity"] > 0
