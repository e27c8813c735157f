"""WINA: thresholds against a plain numpy computation of `quantile_S(|x_i| * ||W[i, :]||)`,
the measured sparsity at the target, greedy allocation, and sparsity 0 = dense."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import LLAMA, OPT, ByteTok

from jaxsparse.calibrate import calibrate
from jaxsparse.methods.teal import group_sizes
from jaxsparse.models import build_model, positions_from_mask

SEQ, TOKENS = 64, 1024
RESOLUTION = 0.0035  # the histogram's relative bin width (docs/methods.md)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "sparse", "token", "layer", "the", "of", "a"]
    (d / "cal.txt").write_text(" ".join(rng.choice(words, 800)))
    return d


@pytest.fixture(scope="module", params=[LLAMA, OPT], ids=["llama", "opt"])
def fitted(request, corpus, make_params):
    config = request.param
    params = make_params(config)
    states = calibrate(
        config,
        params,
        ByteTok(),
        ["wina"],
        [0.0, 0.5],
        [str(corpus / "cal.txt")],
        TOKENS,
        SEQ,
        8,
        progress=False,
    )
    return config, params, states


def _tokens(corpus):
    from jaxsparse.data import pack_tokens, read_documents

    return pack_tokens(read_documents([corpus / "cal.txt"]), ByteTok(), 0, SEQ, TOKENS, "cal")


def _taps(config, params, tokens):
    model = build_model(config)
    valid = jnp.ones(tokens.shape, bool)
    _, v = jax.jit(
        lambda p, t: model.apply({"params": p}, t, positions_from_mask(valid), mutable=["taps"])
    )(params, jnp.asarray(tokens))
    return v["taps"]


def _numpy_norms(config, layer_params):
    """n_i of each point, straight from the kernels ([in, out]; rows concatenated)."""
    a, m = layer_params["self_attn"], layer_params["mlp"]
    k = lambda p: np.asarray(p["kernel"], np.float64)
    qkv = np.concatenate([k(a["q_proj"]), k(a["k_proj"]), k(a["v_proj"])], axis=1)
    ffn = (
        k(m["fc1"])
        if config.family == "opt"
        else np.concatenate([k(m["gate_proj"]), k(m["up_proj"])], axis=1)
    )
    down = k(m["fc2"]) if config.family == "opt" else k(m["down_proj"])
    n = lambda w: np.linalg.norm(w, axis=1)
    return {
        "q_in": n(qkv),
        "kv_in": n(qkv),
        "o_in": n(k(a["o_proj"])),
        "ffn_in": n(ffn),
        "down_in": n(down),
    }


TAP = {
    "q_in": ("self_attn", "q_in"),
    "kv_in": ("self_attn", "kv_in"),
    "o_in": ("self_attn", "o_in"),
    "ffn_in": ("mlp", "ffn_in"),
    "down_in": ("mlp", "down_in"),
}


def test_thresholds_equal_the_numpy_formula(fitted, corpus):
    config, params, states = fitted
    state = states[("wina", 0.5)]
    taps = _taps(config, params, _tokens(corpus))
    for i in range(config.num_layers):
        layer = f"layers_{i}"
        norms = _numpy_norms(config, params[layer])
        th = state.thresholds[layer]
        np.testing.assert_array_equal(th["q_in"], th["kv_in"])  # one input, one threshold
        assert np.all(th["gate"] == 0)
        for p, (sub, name) in TAP.items():
            x = np.abs(np.asarray(taps[layer][sub][name][0], np.float64)).reshape(-1, norms[p].size)
            score = x * norms[p]
            want = np.quantile(score, 0.5, method="inverted_cdf")
            got = th[p].astype(np.float64) * norms[p]  # T = t_i * n_i, the same T for all i
            np.testing.assert_allclose(got, want, rtol=RESOLUTION, err_msg=f"{layer}/{p}")
            # the mask |x_i| >= t_i is WINA's |x_i| n_i >= T: half the scores are zeroed
            zeroed = np.mean(x < th[p])
            assert abs(zeroed - 0.5) < 0.01, (layer, p, zeroed)
            # and it is not TEAL's: the per-channel thresholds differ across channels
            assert np.ptp(th[p]) > 0


def test_sparsity_zero_equals_dense_and_measured_sparsity(fitted, corpus):
    from jaxsparse.evaluate import Evaluator

    config, params, states = fitted
    th0 = states[("wina", 0.0)].thresholds_for_model()
    assert all(np.all(np.asarray(v) == 0) for v in jax.tree.leaves(th0))
    ev = Evaluator(config, params, ByteTok(), SEQ, 8, progress=False)
    tokens = _tokens(corpus)[:8].reshape(-1)
    r = ev.evaluate(states[("wina", 0.5)], tokens)
    pp = r["measured_sparsity"]["per_point"]
    # on the sparse model the inputs downstream shift a little from the dense ones
    for p in ("q_in", "kv_in", "o_in", "ffn_in", "down_in"):
        assert 0.4 <= pp[p] <= 0.6, (p, pp[p])
    assert 0.4 <= r["activated_params_fraction"] <= 0.6


def test_greedy_allocation_reaches_the_layer_sparsity(corpus, make_params):
    params = make_params(LLAMA)
    st_ = calibrate(
        LLAMA,
        params,
        ByteTok(),
        ["wina"],
        [0.5],
        [str(corpus / "cal.txt")],
        TOKENS,
        SEQ,
        8,
        {"wina": {"allocation": "greedy", "greedy_tokens": 128}},
        progress=False,
    )[("wina", 0.5)]
    alloc = st_.meta.details["group_sparsity"]
    sizes = group_sizes(LLAMA)
    taps = _taps(LLAMA, params, _tokens(corpus))
    for layer, s in alloc.items():
        assert sum(s[g] * sizes[g] for g in sizes) / sum(sizes.values()) == pytest.approx(0.5)
        norms = _numpy_norms(LLAMA, params[layer])
        x = np.abs(np.asarray(taps[layer]["mlp"]["ffn_in"][0], np.float64)).reshape(-1, 32)
        np.testing.assert_allclose(
            np.mean(
                x * norms["ffn_in"] < st_.thresholds[layer]["ffn_in"] * norms["ffn_in"] * (1 - 1e-6)
            ),
            s["gate_up"],
            atol=2e-3,
        )
        # the search and the result use WINA's per-channel thresholds T / n_i, not TEAL's
        for p in TAP:
            t = np.asarray(st_.thresholds[layer][p], np.float64)
            if np.all(t == 0):  # a group the greedy search left dense
                continue
            assert np.ptp(t) > 0, (layer, p)
            np.testing.assert_allclose(t * norms[p], np.median(t * norms[p]), rtol=1e-5)


def _equal_row_norms(config, params):
    """`params` with every input channel's weights scaled to norm 1 in the matrices its input
    feeds together (q/k/v; gate/up or fc1; o; down or fc2)."""
    groups = [("self_attn", ("q_proj", "k_proj", "v_proj")), ("self_attn", ("o_proj",))]
    if config.family == "opt":
        groups += [("mlp", ("fc1",)), ("mlp", ("fc2",))]
    else:
        groups += [("mlp", ("gate_proj", "up_proj")), ("mlp", ("down_proj",))]
    params = jax.tree.map(np.asarray, params)
    for i in range(config.num_layers):
        layer = params[f"layers_{i}"]
        for mod, names in groups:
            ks = [np.asarray(layer[mod][n]["kernel"], np.float64) for n in names]
            norm = np.sqrt(sum(np.sum(k * k, axis=1) for k in ks))[:, None]
            for n, k in zip(names, ks):
                layer[mod][n] = {**layer[mod][n], "kernel": (k / norm).astype(np.float32)}
    return params


@pytest.mark.parametrize(
    "config",
    [LLAMA, pytest.param(OPT, marks=pytest.mark.slow)],  # each ~45 s on the loaded 2-core CPU
    ids=["llama", "opt"],
)
def test_equal_row_norms_give_teal(config, corpus, make_params):
    """With every n_i equal, WINA's score orders channels as |x_i| does: its thresholds are
    TEAL's (the row norm of each input's weights is what sets WINA apart, so a norm taken
    over the wrong axis, or over part of a fused q/k/v or gate/up input, fails here)."""
    params = _equal_row_norms(config, make_params(config))
    norms = _numpy_norms(config, params["layers_0"])
    np.testing.assert_allclose(norms["q_in"], 1.0, rtol=1e-6)  # the setup did what it says
    states = calibrate(
        config,
        params,
        ByteTok(),
        ["teal", "wina"],
        [0.5],
        [str(corpus / "cal.txt")],
        TOKENS,
        SEQ,
        8,
        progress=False,
    )
    teal_th, wina_th = states[("teal", 0.5)].thresholds, states[("wina", 0.5)].thresholds
    for layer in teal_th:
        for p in TAP:
            assert np.all(np.asarray(teal_th[layer][p]) > 0), (layer, p)
            np.testing.assert_allclose(
                wina_th[layer][p], teal_th[layer][p], rtol=1e-4, err_msg=f"{layer}/{p}"
            )
