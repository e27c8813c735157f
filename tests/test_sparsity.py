"""The sparsity state: structure, storage, and the checks made when loading it."""

from __future__ import annotations

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tiny import LLAMA

from jaxsparse import rules
from jaxsparse.sparsity import (
    THRESHOLDS_DIR,
    SparsityState,
    StateError,
    dense_state,
    load_state,
    make_state,
    read_state_meta,
    save_state,
)

TINY = LLAMA
OTHER = TINY.replace(intermediate_size=64)


def _state(config=TINY, method="chess+", s=0.5):
    gate = np.linspace(0.1, 1.0, config.intermediate_size).astype(np.float32)
    values = {
        f"layers_{i}": {"gate": gate * (i + 1), "q_in": 0.3, "o_in": 0.2}
        for i in range(config.num_layers)
    }
    return make_state(config, method, s, values, {"tokens": 123}, {"note": "test"})


def test_every_state_has_the_same_tree_structure_and_shapes():
    dense, chess, teal = dense_state(TINY), _state(), _state(method="teal")
    s1 = jax.tree.structure(dense.thresholds_for_model())
    assert s1 == jax.tree.structure(chess.thresholds_for_model())
    assert s1 == jax.tree.structure(teal.thresholds_for_model())
    shapes = jax.tree.map(np.shape, dense.thresholds_for_model())
    assert shapes == jax.tree.map(np.shape, chess.thresholds_for_model())
    assert shapes["layers_0"]["o_in"] == (TINY.q_dim,)
    assert shapes["layers_1"]["gate"] == (TINY.intermediate_size,)
    assert set(shapes["layers_0"]) == set(rules.TENSORS)
    assert all(np.all(v == 0) for v in jax.tree.leaves(dense.thresholds))
    # scalars are broadcast, unused points are zero
    th = chess.thresholds["layers_0"]
    assert np.all(th["q_in"] == np.float32(0.3)) and np.all(th["kv_in"] == 0)


def test_state_is_a_pytree_with_static_meta():
    st = _state()
    leaves, treedef = jax.tree.flatten(st)
    assert len(leaves) == TINY.num_layers * len(rules.TENSORS)
    back = jax.tree.unflatten(treedef, leaves)
    assert isinstance(back, SparsityState) and back.meta == st.meta
    doubled = jax.tree.map(lambda x: x * 2, st)
    assert doubled.method == "chess+"


def test_save_load_roundtrip(tmp_path):
    st = _state()
    save_state(st, tmp_path / "s")
    back = load_state(tmp_path / "s", TINY)
    assert back.meta == st.meta
    assert back.meta.provenance == {"tokens": 123}
    for a, b in zip(jax.tree.leaves(st.thresholds), jax.tree.leaves(back.thresholds)):
        np.testing.assert_array_equal(a, b)
    assert read_state_meta(tmp_path / "s").method == "chess+"
    with pytest.raises(FileExistsError, match="overwrite"):
        save_state(st, tmp_path / "s")
    save_state(dense_state(TINY), tmp_path / "s", overwrite=True)
    assert load_state(tmp_path / "s").method == "dense"


def test_load_for_another_model_names_dir_and_both_models(tmp_path):
    save_state(_state(), tmp_path / "s")
    with pytest.raises(StateError) as e:
        load_state(tmp_path / "s", OTHER)
    msg = str(e.value)
    assert str(tmp_path / "s") in msg and "calibrated for another model" in msg
    assert "intermediate=48" in msg and "intermediate=64" in msg


def test_config_hash_distinguishes_same_shapes(tmp_path):
    save_state(_state(), tmp_path / "s")
    with pytest.raises(StateError, match="config hash"):
        load_state(tmp_path / "s", TINY.replace(rope_theta=5e5))
    # the dtype does not change the fingerprint
    assert load_state(tmp_path / "s", TINY.replace(dtype="bfloat16")).method == "chess+"


def _overwrite_thresholds(directory, tree):
    import shutil

    shutil.rmtree(directory / THRESHOLDS_DIR)
    ocp.PyTreeCheckpointer().save((directory / THRESHOLDS_DIR).absolute(), tree)


def test_shape_mismatch_is_named(tmp_path):
    st = _state()
    save_state(st, tmp_path / "s")
    tree = jax.tree.map(np.asarray, st.thresholds)
    tree["layers_1"]["gate"] = np.zeros(7, np.float32)
    _overwrite_thresholds(tmp_path / "s", tree)
    with pytest.raises(StateError, match=r"layers_1/gate has shape \(7,\), expected \(48,\)"):
        load_state(tmp_path / "s", TINY)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_threshold_names_layer_and_point(tmp_path, bad):
    st = _state()
    save_state(st, tmp_path / "s")
    tree = jax.tree.map(np.asarray, st.thresholds)
    tree["layers_1"]["o_in"] = tree["layers_1"]["o_in"].copy()
    tree["layers_1"]["o_in"][5] = bad
    _overwrite_thresholds(tmp_path / "s", tree)
    kind = "NaN" if np.isnan(bad) else "inf"
    with pytest.raises(StateError, match=rf"layers_1/o_in holds 1 non-finite.*{kind}.*channel 5"):
        load_state(tmp_path / "s")
    with pytest.raises(StateError, match="layers_0/gate holds 48 non-finite"):
        make_state(TINY, "cats", 0.5, {"layers_0": {"gate": bad}})


def test_incomplete_or_foreign_directory(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(Exception, match="incomplete"):
        load_state(tmp_path / "x")
    with pytest.raises(FileNotFoundError):
        load_state(tmp_path / "nope")
