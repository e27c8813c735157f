"""Calibration: histogram quantiles, each method against a plain numpy computation of its
formula, sparsity 0 = dense, the measured sparsity at the target, and bad input."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import LLAMA, OPT, ByteTok, write_words

from jaxsparse.calibrate import calibrate
from jaxsparse.data import DataError
from jaxsparse.methods import check_sparsity
from jaxsparse.methods.statistics import LogBins
from jaxsparse.methods.teal import greedy_allocation, group_sizes
from jaxsparse.models import build_model, positions_from_mask

METHODS = ["cats", "chess", "chess+", "teal"]
SEQ, TOKENS = 64, 1024


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    write_words(rng, d / "cal.txt", 800)
    write_words(rng, d / "eval.txt", 800)
    return d


@pytest.fixture(scope="module", params=[LLAMA, OPT], ids=["llama", "opt"])
def fitted(request, corpus, make_params):
    config = request.param
    params = make_params(config)
    states = calibrate(
        config,
        params,
        ByteTok(),
        METHODS,
        [0.0, 0.5],
        [str(corpus / "cal.txt")],
        TOKENS,
        SEQ,
        8,
        {"teal": {"allocation": "greedy", "greedy_tokens": 128}},
        progress=False,
    )
    return config, params, states


def _calibration_tokens(corpus):
    from jaxsparse.data import pack_tokens, read_documents

    return pack_tokens(read_documents([corpus / "cal.txt"]), ByteTok(), 0, SEQ, TOKENS, "cal")


def _taps(config, params, tokens):
    model = build_model(config)

    @jax.jit
    def run(params, tokens):
        valid = jnp.ones(tokens.shape, bool)
        _, v = model.apply({"params": params}, tokens, positions_from_mask(valid), mutable=["taps"])
        return v["taps"]

    return run(params, jnp.asarray(tokens))


# ------------------------------------------------------------------ histogram quantiles


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    q=st.floats(0.01, 0.99),
    sigma=st.floats(0.3, 4.0),
    zeros=st.floats(0.0, 0.5),
)
def test_histogram_quantile_within_one_bin_of_np_quantile(seed, q, sigma, zeros):
    rng = np.random.default_rng(seed)
    x = rng.lognormal(-2.0, sigma, 5000).astype(np.float32)
    x[: int(zeros * len(x))] = 0.0  # natural zeros (ReLU)
    bins = LogBins()
    counts = np.asarray(bins.histogram(jnp.asarray(x)[None], jnp.ones((1,), bool)))
    assert counts.sum() == len(x)
    got = bins.quantile(counts, q)
    # the sample quantile x_(ceil(qN)): the smallest x with F(x) >= q
    want = np.quantile(x.astype(np.float64), q, method="inverted_cdf")
    if want == 0:
        assert got <= bins.lo
    else:
        assert abs(got / want - 1) <= bins.ratio - 1 + 1e-6
    assert abs(bins.fraction_below(counts, got) - q) < 1e-9
    assert bins.quantile(counts, 0.0) == 0.0


def test_log_bins_resolution_is_as_documented():
    assert LogBins().ratio - 1 < 0.0034


# ------------------------------------------------------------------ methods vs numpy


def test_chess_thresholds_equal_numpy_formula(fitted, corpus):
    config, params, states = fitted
    taps = _taps(config, params, _calibration_tokens(corpus))
    bins = LogBins()
    for i in range(config.num_layers):
        mlp = taps[f"layers_{i}"]["mlp"]
        g = np.abs(np.asarray(mlp["gate"][0], np.float64)).reshape(-1, config.intermediate_size)
        if config.family == "opt":
            mean_u = np.ones(config.intermediate_size)
        else:
            u = np.asarray(mlp["up"][0], np.float64).reshape(-1, config.intermediate_size)
            mean_u = np.abs(u).mean(axis=0)
        q = np.quantile(g * mean_u, 0.5, method="inverted_cdf")
        want = q / mean_u
        got = np.asarray(states[("chess", 0.5)].thresholds[f"layers_{i}"]["gate"], np.float64)
        np.testing.assert_allclose(got, want, rtol=bins.ratio - 1 + 1e-5)
        # chess+ adds per-layer thresholds on the q and o inputs, k/v stay dense
        sa = taps[f"layers_{i}"]["self_attn"]
        plus = states[("chess+", 0.5)].thresholds[f"layers_{i}"]
        np.testing.assert_array_equal(
            plus["gate"], states[("chess", 0.5)].thresholds[f"layers_{i}"]["gate"]
        )
        for point in ("q_in", "o_in"):
            want_t = np.quantile(
                np.abs(np.asarray(sa[point][0], np.float64)), 0.5, method="inverted_cdf"
            )
            np.testing.assert_allclose(plus[point], want_t, rtol=bins.ratio - 1 + 1e-5)
        assert np.all(plus["kv_in"] == 0) and np.all(plus["ffn_in"] == 0)


def test_cats_thresholds_equal_numpy_quantile(fitted, corpus):
    config, params, states = fitted
    taps = _taps(config, params, _calibration_tokens(corpus))
    for i in range(config.num_layers):
        g = np.abs(np.asarray(taps[f"layers_{i}"]["mlp"]["gate"][0], np.float64))
        got = states[("cats", 0.5)].thresholds[f"layers_{i}"]["gate"]
        assert np.all(got == got[0])
        if np.mean(g == 0) >= 0.5:  # OPT: ReLU's natural zeros already reach the target
            assert got[0] <= LogBins().lo
        else:
            want = np.quantile(g, 0.5, method="inverted_cdf")
            np.testing.assert_allclose(got[0], want, rtol=LogBins().ratio - 1 + 1e-5)


def test_teal_greedy_reaches_the_layer_sparsity(fitted, corpus):
    config, params, states = fitted
    st_ = states[("teal", 0.5)]
    alloc = st_.meta.details["group_sparsity"]
    sizes = group_sizes(config)
    total = sum(sizes.values())
    taps = _taps(config, params, _calibration_tokens(corpus))
    for layer, s in alloc.items():
        assert sum(s[g] * sizes[g] for g in sizes) / total == pytest.approx(0.5, abs=1e-6)
        # thresholds are the dense-model quantiles at the allocated group sparsities
        x = np.abs(np.asarray(taps[layer]["mlp"]["ffn_in"][0], np.float64))
        th = st_.thresholds[layer]
        np.testing.assert_allclose(np.mean(x < th["ffn_in"][0]), s["gate_up"], atol=2e-3)
        np.testing.assert_array_equal(th["q_in"], th["kv_in"])
        assert np.all(th["gate"] == 0)


def test_greedy_allocation_picks_the_cheapest_group_and_stops_at_target():
    sizes = {"a": 100, "b": 300}
    # error grows only with b's sparsity: the greedy loads everything on a (up to the cap)
    alloc, trace = greedy_allocation(
        lambda cands: [c["b"] for c in cands], sizes, 0.3, step=0.05, max_group_sparsity=0.99
    )
    assert alloc["b"] == pytest.approx((0.3 * 400 - 99) / 300)
    assert alloc["a"] == pytest.approx(0.99)
    assert trace[-1][0] == pytest.approx(0.3)
    assert all(t2[0] >= t1[0] for t1, t2 in itertools.pairwise(trace))
    alloc, _ = greedy_allocation(lambda cands: [c["a"] for c in cands], sizes, 0.5)
    assert alloc == {"a": 0.0, "b": pytest.approx(0.5 * 400 / 300)}
    assert greedy_allocation(lambda c: [0] * len(c), sizes, 0.0)[0] == {"a": 0.0, "b": 0.0}


# ------------------------------------------------------------------ sparsity 0 and S


def _logits(config, params, tokens, thresholds):
    model = build_model(config)

    @jax.jit
    def run(params, tokens, thresholds):
        valid = jnp.ones(tokens.shape, bool)
        return model.apply(
            {"params": params}, tokens, positions_from_mask(valid), thresholds=thresholds
        )[0]

    return np.asarray(run(params, jnp.asarray(tokens), thresholds))


def test_sparsity_zero_equals_dense(fitted, corpus):
    config, params, states = fitted
    tokens = _calibration_tokens(corpus)[:2]
    dense = _logits(config, params, tokens, None)
    for m in METHODS:
        th = states[(m, 0.0)].thresholds_for_model()
        assert all(np.all(np.asarray(v) == 0) for v in jax.tree.leaves(th))
        got = _logits(config, params, tokens, th)
        np.testing.assert_allclose(got, dense, rtol=1e-6, atol=1e-6 * np.abs(dense).max())


def test_measured_sparsity_on_other_text_is_near_target(fitted, corpus):
    from jaxsparse.data import pack_tokens, read_documents
    from jaxsparse.evaluate import Evaluator

    config, params, states = fitted
    ev = Evaluator(config, params, ByteTok(), SEQ, 8, progress=False)
    tokens = pack_tokens(read_documents([corpus / "eval.txt"]), ByteTok(), 0, SEQ, 512, "e")
    # OPT's ReLU already zeroes part of the gate (0.44 of it here): the thresholds must
    # add the rest, so the bound is two-sided for both families and above the dense zeros.
    dense_ffn = ev.evaluate(None, tokens.reshape(-1))["measured_sparsity"]["ffn"]
    assert dense_ffn < 0.45 if config.family == "opt" else dense_ffn == 0
    for m in ("cats", "chess"):
        r = ev.evaluate(states[(m, 0.5)], tokens.reshape(-1))
        ffn = r["measured_sparsity"]["ffn"]
        assert 0.45 <= ffn <= 0.55, (m, ffn)
        assert ffn > dense_ffn + 0.03, (m, ffn, dense_ffn)
    r = ev.evaluate(states[("chess+", 0.5)], tokens.reshape(-1))
    pp = r["measured_sparsity"]["per_point"]
    assert 0.4 <= pp["q_in"] <= 0.6 and 0.4 <= pp["o_in"] <= 0.6 and pp["kv_in"] == 0


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("s", [-0.1, 1.0, 1.5, float("nan"), "abc"])
def test_sparsity_outside_range_is_refused(s, corpus):
    with pytest.raises(ValueError, match="outside|not a number"):
        check_sparsity(s)
    with pytest.raises(ValueError, match=r"outside \[0, 1\)|not a number"):
        calibrate(LLAMA, None, ByteTok(), ["cats"], [s], [str(corpus / "cal.txt")])


def test_calibration_batches_are_not_padded_past_the_rows():
    """Rows fewer than a batch run in the next power of two of rows (rounded up to the
    data-parallel size), not padded to the full batch; more rows run in full batches, the
    last padded with invalid rows."""
    from jaxsparse.calibrate import sequence_batches
    from jaxsparse.sharding import make_mesh, rows_per_batch

    seqs = np.arange(3 * 4, dtype=np.int32).reshape(3, 4) + 1
    make, num = sequence_batches(seqs, 8)
    (tokens, valid), *rest = list(make())
    assert num == 1 and not rest and tokens.shape == (4, 4)
    np.testing.assert_array_equal(tokens[:3], seqs)
    assert valid[:3].all() and not valid[3].any()
    make, num = sequence_batches(np.ones((20, 4), np.int32), 8)
    got = list(make())
    assert num == 3 and [t.shape[0] for t, _ in got] == [8, 8, 8]
    assert [int(v[:, 0].sum()) for _, v in got] == [8, 8, 4]
    assert [rows_per_batch(n, 8) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 8]
    assert rows_per_batch(3, 3) == 3
    one = make_mesh(1, 1, jax.devices()[:1])
    assert rows_per_batch(3, 8, one) == 4


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown method 'dejavu2'; known: cats, chess"):
        calibrate(LLAMA, None, ByteTok(), ["dejavu2"], [0.5])


def test_empty_and_short_data_files(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("just a few words")
    with pytest.raises(DataError, match="empty.txt: contains no text"):
        calibrate(LLAMA, None, ByteTok(), ["cats"], [0.5], [str(tmp_path / "empty.txt")])
    with pytest.raises(DataError, match=r"short.txt: found 17 tokens, need 1024"):
        calibrate(
            LLAMA,
            None,
            ByteTok(),
            ["cats"],
            [0.5],
            [str(tmp_path / "short.txt")],
            tokens=1000,
            seq_len=64,
        )


# ------------------------------------------------------------------ SmolLM2


@pytest.fixture(scope="module")
def smollm2_fitted(smollm2):
    states = calibrate(
        smollm2.config,
        smollm2.params,
        smollm2.tokenizer,
        METHODS,
        [0.0, 0.5],
        None,
        tokens=2048,
        seq_len=256,
        batch_size=8,
        progress=False,
    )
    return smollm2, states


@pytest.mark.slow
def test_smollm2_sparsity_zero_equals_dense(smollm2_fitted):
    lm, states = smollm2_fitted
    tokens = np.asarray(
        lm.tokenizer.encode(
            "def f(x):\n    return x + 1  # the answer is", add_special_tokens=False
        ),
        np.int32,
    )[None]
    model = build_model(lm.config)

    @jax.jit
    def fwd(params, tokens, thresholds):
        positions = positions_from_mask(jnp.ones(tokens.shape, bool))
        return model.apply({"params": params}, tokens, positions, thresholds=thresholds)[0]

    dense = np.asarray(fwd(lm.params, tokens, None))
    for m in METHODS:
        got = np.asarray(fwd(lm.params, tokens, states[(m, 0.0)].thresholds_for_model()))
        rel = np.abs(got - dense).max() / np.abs(dense).max()
        assert rel <= 1e-6, (m, rel)


@pytest.mark.slow
def test_smollm2_measured_ffn_sparsity_at_half(smollm2_fitted):
    """Calibrated on the calibration split, measured on the evaluation split."""
    from jaxsparse.evaluate import Evaluator, ppl_token_ids

    lm, states = smollm2_fitted
    assert states[("chess", 0.5)].meta.provenance["builtin_corpus"]["split"] == "calibration"
    ids = ppl_token_ids(lm.config, lm.tokenizer, None, 1024)
    ev = Evaluator(lm.config, lm.params, lm.tokenizer, 256, 8, progress=False)
    for m in ("cats", "chess"):
        ffn = ev.evaluate(states[(m, 0.5)], ids)["measured_sparsity"]["ffn"]
        assert 0.45 <= ffn <= 0.55, (m, ffn)
