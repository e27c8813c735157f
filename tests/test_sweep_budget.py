"""The equal-budget sweep on a tiny model: each method's solved sparsity reads the target
fraction on the calibration text (and close to it on other text), unreachable targets are
reported, a dejavu state is re-pointed by ffn_k, and a rerun reuses the states."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny import LLAMA, ByteTok, Loaded, sweep_corpus, sweep_kwargs

from jaxsparse.sweep_budget import solve_sparsity, sweep_fractions

TOL = 2e-3


def test_solve_sparsity_on_a_monotone_curve():
    class S:  # a "state" whose fraction is 1 - 0.8 s
        def __init__(self, s):
            self.s = s

        def thresholds_for_model(self):
            return self.s

    s, f, trace = solve_sparsity(S, lambda s: 1 - 0.8 * s, 0.6, 1e-6)
    assert s == pytest.approx(0.5, abs=1e-5) and f == pytest.approx(0.6, abs=1e-6)
    assert len(trace) < 12
    from jaxsparse.budget import BudgetError

    with pytest.raises(BudgetError, match="out of reach"):
        solve_sparsity(S, lambda s: 1 - 0.2 * s, 0.6, 1e-6)


@pytest.mark.slow
def test_equal_fraction_sweep(tmp_path, make_params):
    from PIL import Image

    _, cal, ev = sweep_corpus(tmp_path, 800)
    lm = Loaded(LLAMA, make_params(LLAMA), ByteTok())
    out = tmp_path / "sweep"
    kw = sweep_kwargs(cal, ev, 1024, measure_tokens=1024, tol=TOL)
    results = sweep_fractions(lm, ["chess", "teal", "wina"], [0.5, 0.75], out, **kw)
    by = {(r["method"], r["budget"]["target_fraction"]): r for r in results}
    assert by[("dense", 1.0)]["activated_params_fraction"] == pytest.approx(1.0)
    # chess cannot go below attention + gate_proj + a sliver: 0.5 is out of its reach
    assert by[("chess", 0.5)]["activated_params_fraction"] is None
    assert by[("chess", 0.5)]["budget"]["note"] == "out of reach"
    for m in ("chess", "teal", "wina"):
        for f in (0.5, 0.75):
            if (m, f) == ("chess", 0.5):
                continue
            r = by[(m, f)]
            assert r["budget"]["calibration_fraction"] == pytest.approx(f, abs=TOL), (m, f)
            # on other text (the evaluation file) the fraction stays close
            assert r["activated_params_fraction"] == pytest.approx(f, abs=0.05), (m, f)
            assert r["perplexity"] > 0
    # teal and wina at one fraction solve different sparsity knobs per method
    table = json.loads((out / "table.json").read_text())
    assert len(table) == 1 + 6
    # each method against the first evaluated at its fraction, paired over windows
    vs = {(t["method"], t["target_fraction"]): t["ppl_vs_first"] for t in table}
    assert vs[("dense", 1.0)] is None and vs[("chess", 0.75)] is None  # the reference
    assert vs[("teal", 0.5)] is None  # chess is out of reach at 0.5: teal is the first
    assert vs[("wina", 0.5)].endswith("vs teal") and vs[("teal", 0.75)].endswith("vs chess")
    diff = by[("wina", 0.5)]["perplexity"] - by[("teal", 0.5)]["perplexity"]
    assert vs[("wina", 0.5)].startswith(f"{diff:+.3f} [")
    assert "out of reach" in (out / "table.md").read_text()
    with Image.open(out / "ppl_vs_fraction.png") as im:
        assert im.size[0] > 300
    # a rerun reuses states and results
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "results").glob("*.json")}
    again = sweep_fractions(lm, ["chess", "teal", "wina"], [0.5, 0.75], out, **kw)
    assert [r.get("perplexity") for r in again] == [r.get("perplexity") for r in results]
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())


@pytest.mark.slow
def test_dejavu_state_is_repointed_to_the_fraction(tmp_path):
    from jaxsparse.budget import FractionMeter
    from jaxsparse.models import init_params
    from jaxsparse.predictors import dejavu_state, init_predictors
    from jaxsparse.sparsity import linear_sizes, predictor_weights
    from jaxsparse.sweep_budget import solve_dejavu

    params = init_params(LLAMA)
    w = {k: np.asarray(v) for k, v in init_predictors(LLAMA, 8, 4).items()}
    st = dejavu_state(LLAMA, w, 24, LLAMA.num_heads)
    seqs = np.random.default_rng(0).integers(1, 250, (2, 32)).astype(np.int32)
    meter = FractionMeter(LLAMA, params, seqs)
    got, frac, _ = solve_dejavu(st, meter, 0.7, 1e-3)
    k = int(got.predictors["layers_0"]["ffn_k"])
    s = linear_sizes(LLAMA)
    attn = s["q_proj"] + s["k_proj"] + s["v_proj"] + s["o_proj"]
    ffn = s["gate_proj"] + s["up_proj"] + s["down_proj"]
    pred = predictor_weights(got.predictors["layers_0"])
    want = lambda kk: (attn + ffn * kk / 48 + pred) / (attn + ffn)
    assert frac == pytest.approx(want(k), rel=1e-5)
    assert abs(want(k) - 0.7) <= min(abs(want(k + 1) - 0.7), abs(want(k - 1) - 0.7))
