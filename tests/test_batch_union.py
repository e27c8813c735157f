"""`benchmarks/batch_union.py`: the union of active channels over a batch's rows (the model
run is the models' own forward, tested elsewhere)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import batch_union


def _groups(batches=(2, 4), windows=8, seq_len=40):
    return batch_union.draw_groups(batches, windows, seq_len, 200, 0)


def test_identical_rows_union_is_one_row():
    rng = np.random.default_rng(0)
    one = rng.random((3, 1, 1, 64)) < 0.3  # every window and token keeps the same channels
    row = batch_union.point_union(np.broadcast_to(one, (3, 8, 40, 64)), _groups())
    assert row["layers"] == 3
    for B in (2, 4):
        assert row[f"union_b{B}"] == pytest.approx(row["single"])
        assert row[f"independent_b{B}"] > row["single"]


def test_independent_rows_follow_the_formula():
    rng = np.random.default_rng(1)
    kept = rng.random((4, 8, 40, 512)) < 0.25
    row = batch_union.point_union(kept, _groups())
    assert row["single"] == pytest.approx(0.25, abs=0.01)
    for B in (2, 4):
        assert row[f"union_b{B}"] == pytest.approx(1 - 0.75**B, abs=0.01)
        assert row[f"independent_b{B}"] == pytest.approx(1 - (1 - row["single"]) ** B)


def test_disjoint_rows_add_up():
    kept = np.zeros((1, 8, 40, 64), bool)
    for w in range(8):  # window w keeps channels 8w .. 8w+7 only
        kept[:, w, :, 8 * w : 8 * w + 8] = True
    row = batch_union.point_union(kept, _groups())
    assert row["single"] == pytest.approx(0.125)
    assert row["union_b2"] == pytest.approx(0.25)
    assert row["union_b4"] == pytest.approx(0.5)


def test_groups_are_distinct_windows_past_the_first_tokens():
    for B, picks in _groups(batches=(2, 8)).items():
        for seqs, pos in picks:
            assert len(set(seqs.tolist())) == B and 16 <= pos < 40


def test_bad_arguments_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        batch_union.main([str(tmp_path)])
    assert "no state.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        batch_union.main([str(tmp_path), "--batches", "1,4"])
    assert "--batches" in capsys.readouterr().err


@pytest.mark.slow
def test_runs_on_smollm2_with_a_teal_state(tmp_path, smollm2):
    """End to end on the default model: every TEAL point is reported, a batch keeps more
    than one row and at most what independent rows would (plus sampling noise), and the
    JSON is written."""
    from jaxsparse.sparsity import make_state, save_state

    c = smollm2.config
    points = {"q_in": 0.3, "kv_in": 0.3, "o_in": 0.05, "ffn_in": 0.3, "down_in": 0.02}
    values = {f"layers_{i}": dict(points) for i in range(c.num_layers)}
    save_state(make_state(c, "teal", 0.5, values), tmp_path / "teal")
    out = tmp_path / "union.json"
    args = [str(tmp_path / "teal"), "--sequences", "4", "--seq-len", "48", "--batches", "2,4"]
    assert batch_union.main([*args, "--samples", "16", "--json", str(out)]) == 0
    result = json.loads(out.read_text())["states"][str(tmp_path / "teal")]
    assert set(result["points"]) == set(points)
    for row in [*result["points"].values(), result["weighted"]]:
        assert 0.0 < row["single"] < 1.0
        assert row["single"] < row["union_b2"] <= row["union_b4"] <= 1.0
        assert row["union_b4"] <= row["independent_b4"] + 0.05
