"""`benchmarks/paired_ppl.py`: the paired bootstrap of a perplexity difference (the model
run itself is `Evaluator`'s, tested in test_evaluate.py)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import paired_ppl


def _windows(seed: int, n: int = 16, length: int = 511) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.gamma(2.0, 1.5, length) for _ in range(n)]


def test_equal_states_give_a_zero_interval():
    a = _windows(0)
    lo, hi, p_below = paired_ppl.bootstrap(a, [w.copy() for w in a], 500, 0)
    assert lo == hi == 0.0 and p_below == 0.0


def test_a_shift_is_inside_its_interval_and_the_sign_is_certain():
    """B = A + 0.01 nats on every token: ppl(B) - ppl(A) = ppl(A) (e^0.01 - 1) whatever the
    resample, and every resample puts B above A."""
    a = _windows(1)
    b = [w + 0.01 for w in a]
    lo, hi, p_below = paired_ppl.bootstrap(a, b, 500, 0)
    ppl_a = paired_ppl.ppl_of(np.concatenate(a))
    assert p_below == 0.0
    assert lo > 0 and lo <= ppl_a * (math.exp(0.01) - 1) * 1.5
    assert hi >= lo


def test_noise_alone_gives_an_interval_around_zero():
    a = _windows(2)
    rng = np.random.default_rng(3)
    b = [w + rng.normal(0, 0.5, w.shape) for w in a]
    lo, hi, p_below = paired_ppl.bootstrap(a, b, 2000, 0)
    assert lo < 0 < hi and 0.02 < p_below < 0.98


def test_a_path_without_a_state_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        paired_ppl.main([str(tmp_path), str(tmp_path)])
    assert "is neither a sparsity state directory" in capsys.readouterr().err


def test_two_result_jsons_are_compared_without_the_model(tmp_path, capsys):
    import json

    a = {
        "method": "teal",
        "perplexity": 20.0,
        "window_nll": [30.0, 31.0, 29.5],
        "window_tokens": [10, 10, 10],
    }
    b = {**a, "method": "wina", "window_nll": [30.5, 31.2, 30.0]}
    b["perplexity"] = math.exp(sum(b["window_nll"]) / 30)
    a["perplexity"] = math.exp(sum(a["window_nll"]) / 30)
    pa, pb, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "out" / "d.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    assert paired_ppl.main([str(pa), str(pb), "--json", str(out), "--resamples", "500"]) == 0
    d = json.loads(out.read_text())
    assert d["method_a"] == "teal" and d["method_b"] == "wina" and d["windows"] == 3
    assert d["ppl_b_minus_a"] == pytest.approx(b["perplexity"] - a["perplexity"])
    assert d["interval95"][0] > 0  # B is worse in every window
    pb.write_text(json.dumps({**b, "window_tokens": [10, 10, 11]}))
    with pytest.raises(SystemExit):
        paired_ppl.main([str(pa), str(pb)])
    assert "same windows" in capsys.readouterr().err
