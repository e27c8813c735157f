"""End-to-end learned thresholds (`learn-kl`): on a tiny model the KL to the dense model
falls at the same activated-params fraction, the final rescale hits the target fraction,
resume is bitwise, and bad settings are refused."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny

from jaxsparse.budget import BudgetError, solve_scale
from jaxsparse.calibrate import sequence_batches
from jaxsparse.learn_kl import KLSettings, LearnError, learn_kl
from jaxsparse.methods import get_method
from jaxsparse.methods.statistics import collect_statistics
from jaxsparse.sparsity import make_state
from jaxsparse.training import latest_checkpoint, load_checkpoint

LLAMA = tiny.LLAMA.replace(vocab_size=97, intermediate_size=64)
TARGET = 0.6


@pytest.fixture(scope="module")
def tiny(make_params):
    params = make_params(LLAMA)
    seqs = np.random.default_rng(0).integers(1, LLAMA.vocab_size, (16, 32)).astype(np.int32)

    def cal(method, s):
        mod = get_method(method)
        b, n = sequence_batches(seqs, 4)
        stats = collect_statistics(
            LLAMA, params, b, mod.requirements(), num_batches=n, progress=False
        )
        return make_state(LLAMA, method, s, mod.fit(stats, s)[0])

    return params, seqs, [cal("chess", 0.5), cal("wina", 0.1)]


def _measured_fraction(params, seqs, state):
    from jaxsparse.evaluate import Evaluator

    class Tok:
        pass

    ev = Evaluator(LLAMA, params, Tok(), seqs.shape[1], 8, progress=False)
    return ev.evaluate(state, seqs.reshape(-1))["activated_params_fraction"]


@pytest.mark.slow
def test_kl_falls_at_the_same_fraction_and_the_target_is_hit(tiny):
    params, seqs, inits = tiny
    cfg = KLSettings(TARGET, steps=60, lr=0.03, penalty=30.0, batch_seqs=8)
    state, info = learn_kl(
        LLAMA, params, seqs, inits, cfg, progress=False, measure_tokens=seqs.size, fraction_tol=2e-3
    )
    assert state.method == "kl-learned"
    state.check_model(LLAMA)
    # the final rescale: the fraction `eval` measures on the training text is the target
    assert info["final_fraction_on_training_text"] == pytest.approx(TARGET, abs=2e-3)
    got = _measured_fraction(params, seqs, state)
    assert got == pytest.approx(TARGET, abs=2e-3 + 1e-4)
    # the start was on budget too (rescaled base), so the KLs compare at one fraction
    assert info["initial_fraction"] == pytest.approx(TARGET, abs=2e-3)
    tr = info["trainer"]
    zero = {p: jnp.zeros_like(v) for p, v in info["training_state"]["theta"].items()}
    kl_init = tr.hard_kl(zero)
    kl_learned = tr.hard_kl(info["training_state"]["theta"], info["final_log_scale"])
    assert kl_learned < 0.9 * kl_init, (kl_init, kl_learned)
    # the allocation moved: the learned per-layer, per-point scales are not all equal
    offsets = [v for layer in info["log_scale_offsets"].values() for v in layer.values()]
    assert np.ptp(offsets) > 0.05


def test_resume_is_bitwise_identical(tiny, tmp_path):
    params, seqs, inits = tiny
    cfg = KLSettings(TARGET, steps=4, lr=0.05, batch_seqs=4)
    kw = {"progress": False, "measure_tokens": 128, "fraction_tol": 0.01}
    whole, _ = learn_kl(LLAMA, params, seqs, inits, cfg, tmp_path / "a", save_every=2, **kw)
    none, ts2 = learn_kl(
        LLAMA, params, seqs, inits, cfg, tmp_path / "b", save_every=2, stop_at=2, **kw
    )
    assert none is None and ts2["step"] == 2
    ck = load_checkpoint(latest_checkpoint(tmp_path / "b"), ts2)
    for a, b in zip(jax.tree.leaves(ck["opt_state"]), jax.tree.leaves(ts2["opt_state"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    resumed, info = learn_kl(
        LLAMA, params, seqs, inits, cfg, tmp_path / "b", save_every=2, resume=True, **kw
    )
    assert info["start_step"] == 2 and info["final_step"] == 4  # it did resume
    for layer in whole.thresholds:
        for p in cfg.points:
            np.testing.assert_array_equal(whole.thresholds[layer][p], resumed.thresholds[layer][p])
    with pytest.raises(LearnError, match="other settings"):
        learn_kl(
            LLAMA,
            params,
            seqs,
            inits,
            KLSettings(0.7, steps=4, lr=0.05, batch_seqs=4),
            tmp_path / "b",
            resume=True,
            **kw,
        )


def test_solve_scale_and_bad_settings():
    # a monotone fraction of log c: the solver lands within the tolerance
    _, f, trace = solve_scale(lambda c: 1.0 / (1.0 + np.exp(c - 1.3)), 0.3, 1e-4)
    assert abs(f - 0.3) <= 1e-4 and len(trace) < 25
    with pytest.raises(BudgetError, match="out of reach"):
        solve_scale(lambda c: 0.5 + 0.1 * np.tanh(c), 0.2, 1e-4)
    with pytest.raises(LearnError, match="--target-fraction 1.5"):
        KLSettings(1.5)
    with pytest.raises(LearnError, match="--points"):
        KLSettings(0.5, points=("gate", "up"))
    with pytest.raises(LearnError, match="--granularity"):
        KLSettings(0.5, granularity="block")


def test_a_point_no_state_thresholds_is_refused(tiny):
    params, seqs, inits = tiny
    with pytest.raises(LearnError, match="no --init state thresholds point 'q_in'"):
        learn_kl(LLAMA, params, seqs, inits[:1], KLSettings(TARGET, steps=1), progress=False)
