"""Learned thresholds: the relaxed masks, training lowering the loss on a tiny model, the
final rescale hitting the target sparsity, bitwise-exact resume, and bad input."""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxsparse import rules
from jaxsparse.calibrate import sequence_batches
from jaxsparse.learn import (
    LearnError,
    LearnSettings,
    Trainer,
    dense_inputs,
    init_theta,
    learn,
)
from jaxsparse.methods import get_method
from jaxsparse.methods.statistics import collect_statistics
from jaxsparse.registry import KERNEL_POINTS
from jaxsparse.sparsity import make_state
from jaxsparse.training import latest_checkpoint, load_checkpoint

LLAMA = tiny.LLAMA.replace(vocab_size=97, intermediate_size=64)


@pytest.fixture(scope="module")
def tiny(make_params):
    params = make_params(LLAMA)
    seqs = np.random.default_rng(0).integers(1, LLAMA.vocab_size, (8, 32)).astype(np.int32)
    return params, seqs


def _calibrated(config, params, seqs, method, s):
    mod = get_method(method)
    batches, num = sequence_batches(seqs, 4)
    stats = collect_statistics(
        config, params, batches, mod.requirements(), num_batches=num, progress=False
    )
    values, _ = mod.fit(stats, s)
    return make_state(config, method, s, values)


# ------------------------------------------------------------------ relaxed masks


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=1, max_size=40),
    st.floats(0.01, 5.0),
)
def test_soft_mask_tends_to_hard_mask(xs, t):
    x = jnp.asarray(xs, jnp.float32)
    hard = (jnp.abs(x) >= t).astype(jnp.float32)
    margin = jnp.abs(jnp.abs(x) - t)
    far = margin > 1e-3  # on the threshold itself the sigmoid is 1/2 at any temperature
    errs = []
    for tau in (1.0, 0.1, 1e-2, 1e-3, 1e-5):
        soft = rules.soft_mask(x, jnp.float32(t), tau)
        errs.append(float(jnp.max(jnp.where(far, jnp.abs(soft - hard), 0.0))))
    assert all(a >= b - 1e-7 for a, b in itertools.pairwise(errs)), errs  # monotone in tau
    assert errs[-1] < 1e-6


def test_straight_through_mask_is_hard_forward_sigmoid_backward():
    x = jnp.asarray([0.1, 0.5, 0.9, -2.0])
    t = jnp.float32(0.5)
    m = rules.straight_through_mask(x, t, 0.1)
    np.testing.assert_array_equal(np.asarray(m), [0, 1, 1, 1])
    g = jax.grad(lambda tt: jnp.sum(rules.straight_through_mask(x, tt, 0.1)))(t)
    g_soft = jax.grad(lambda tt: jnp.sum(rules.soft_mask(x, tt, 0.1)))(t)
    np.testing.assert_allclose(g, g_soft, rtol=1e-6)
    assert g < 0  # raising the threshold removes entries
    # relaxed_sparsify's forward value is sparsify's
    xs = jax.random.normal(jax.random.key(0), (5, 7))
    ts = jnp.abs(jax.random.normal(jax.random.key(1), (7,)))
    np.testing.assert_array_equal(rules.relaxed_sparsify(xs, ts, 0.2), rules.sparsify(xs, ts))


# ------------------------------------------------------------------ training


@pytest.mark.slow
@pytest.mark.parametrize("method", ["chess", "teal"])
def test_training_lowers_the_loss_and_hits_the_target(tiny, method):
    params, seqs = tiny
    s = 0.5
    init = _calibrated(LLAMA, params, seqs, method, s)
    data = dense_inputs(LLAMA, params, seqs, method)
    cfg = LearnSettings(method, s, steps=40, lr=0.05, batch_tokens=256)
    tr = Trainer(LLAMA, params, data, cfg)
    ts0 = tr.init(init_theta(init, method))
    # full-data loss at a fixed temperature, before and after training
    before = float(tr.full_loss(ts0["theta"], 0.05))
    ts = tr.run(ts0, cfg.steps, progress=False)
    after = float(tr.full_loss(ts["theta"], 0.05))
    assert after < 0.97 * before, (before, after)
    # the point: at the same hard sparsity (after the rescale), a smaller output error
    # than the closed-form thresholds it started from
    th, _ = tr.finalize(ts["theta"])
    err_init, sp_init = tr.hard_error(ts0["theta"])
    err_learned, sp_learned = tr.hard_error({p: jnp.log(jnp.asarray(v)) for p, v in th.items()})
    assert sp_learned >= sp_init - 0.01, (sp_init, sp_learned)
    assert err_learned < 0.95 * err_init, (err_init, err_learned)
    state, _ = learn(LLAMA, params, seqs, init, dataclasses.replace(cfg, steps=5), progress=False)
    assert state.method == f"{method}-learned"
    state.check_model(LLAMA)
    zs = _measured_zero_fraction(params, seqs, state.thresholds_for_model())
    for layer, points in zs.items():
        for p in KERNEL_POINTS[state.method]:
            if p in state.meta.details["points"]:
                assert abs(points[p] - s) < 0.02, (layer, p, points[p])


def _measured_zero_fraction(params, seqs, thresholds):
    """Hard zero fraction of every point, with each layer fed the dense input (as trained)."""
    from jaxsparse.learn import _layer_fns, stack_layer_params

    out = {}
    for method in ("chess", "teal"):
        data = dense_inputs(LLAMA, params, seqs, method)
        f = _layer_fns(LLAMA, method)
        stacked = stack_layer_params(params, LLAMA)
        for i in range(LLAMA.num_layers):
            lp = jax.tree.map(lambda a, i=i: a[i], stacked)
            th = {p: jnp.asarray(v) for p, v in thresholds[f"layers_{i}"].items()}
            _, taps = jax.jit(f)(lp, jnp.asarray(data["x"][i]), th)
            from jaxsparse.learn import _tap

            d = out.setdefault(f"layers_{i}", {})
            pts = ("gate",) if method == "chess" else ("q_in", "kv_in", "o_in", "ffn_in", "down_in")
            for p in pts:
                raw = np.abs(np.asarray(_tap(taps, p)))
                d[p] = float(np.mean(raw < np.asarray(th[p])))
    return out


def test_resume_is_bitwise_identical(tiny, tmp_path):
    params, seqs = tiny
    init = _calibrated(LLAMA, params, seqs, "chess", 0.5)
    cfg = LearnSettings("chess", 0.5, steps=6, lr=0.05, batch_tokens=64)
    whole, _ = learn(LLAMA, params, seqs, init, cfg, tmp_path / "a", save_every=3, progress=False)
    none, ts3 = learn(
        LLAMA, params, seqs, init, cfg, tmp_path / "b", save_every=3, progress=False, stop_at=3
    )
    assert none is None and ts3["step"] == 3
    # the checkpoint holds exactly the state at step 3, optimizer state included
    ck = load_checkpoint(latest_checkpoint(tmp_path / "b"), ts3)
    assert ck["step"] == 3
    for a, b in zip(jax.tree.leaves(ck["opt_state"]), jax.tree.leaves(ts3["opt_state"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(ck["opt_state"][0].count) == 3
    np.testing.assert_array_equal(jax.random.key_data(ck["key"]), jax.random.key_data(ts3["key"]))
    resumed, info = learn(
        LLAMA, params, seqs, init, cfg, tmp_path / "b", save_every=3, resume=True, progress=False
    )
    assert info["final_step"] == 6
    for layer in whole.thresholds:
        np.testing.assert_array_equal(
            whole.thresholds[layer]["gate"], resumed.thresholds[layer]["gate"]
        )
    # and training changed something (so equality is not trivial)
    assert any(
        not np.array_equal(whole.thresholds[k]["gate"], init.thresholds[k]["gate"])
        for k in whole.thresholds
    )


@pytest.mark.slow
def test_resume_refuses_another_method_model_or_settings(tiny, tmp_path, make_params):
    params, seqs = tiny
    init = _calibrated(LLAMA, params, seqs, "chess", 0.5)
    cfg = LearnSettings("chess", 0.5, steps=2, batch_tokens=64)
    learn(LLAMA, params, seqs, init, cfg, tmp_path / "c", save_every=1, progress=False)
    teal_init = _calibrated(LLAMA, params, seqs, "teal", 0.5)
    with pytest.raises(LearnError, match="method 'chess', not 'teal'"):
        learn(
            LLAMA,
            params,
            seqs,
            teal_init,
            LearnSettings("teal", 0.5, steps=2),
            tmp_path / "c",
            resume=True,
            progress=False,
        )
    other = dataclasses.replace(LLAMA, intermediate_size=48)
    p2 = make_params(other)
    with pytest.raises(LearnError, match="another model"):
        learn(
            other,
            p2,
            seqs,
            _calibrated(other, p2, seqs, "chess", 0.5),
            cfg,
            tmp_path / "c",
            resume=True,
            progress=False,
        )
    with pytest.raises(LearnError, match="other settings"):
        learn(
            LLAMA,
            params,
            seqs,
            init,
            dataclasses.replace(cfg, sparsity=0.7),
            tmp_path / "c",
            resume=True,
            progress=False,
        )
    with pytest.raises(LearnError, match="no learn checkpoint"):
        learn(LLAMA, params, seqs, init, cfg, tmp_path / "empty", resume=True, progress=False)
    with pytest.raises(LearnError, match="already holds checkpoints"):
        learn(LLAMA, params, seqs, init, cfg, tmp_path / "c", progress=False)
    with pytest.raises(LearnError, match="starts from a 'chess' state"):
        learn(LLAMA, params, seqs, teal_init, cfg, progress=False)


def test_cli_bad_input(tmp_path, capsys):
    from jaxsparse.cli import main

    assert (
        main(["learn", "--method", "chess", "--sparsity", "1.5", "--out", str(tmp_path / "o")]) == 2
    )
    assert "outside [0, 1)" in capsys.readouterr().err
    assert (
        main(
            [
                "learn",
                "--method",
                "chess",
                "--sparsity",
                "0.5",
                "--resume",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "no learn checkpoint" in capsys.readouterr().err
    assert (
        main(["learn", "--method", "cats", "--sparsity", "0.5", "--out", str(tmp_path / "o")]) == 2
    )
    assert "invalid choice: 'cats'" in capsys.readouterr().err
