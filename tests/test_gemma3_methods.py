"""Every sparsity method on a tiny Gemma 3 (GeGLU gate, sliding-window and global layers):
calibrate -> thresholds -> generate (XLA, and the Pallas kernels in interpret mode) -> eval;
Deja Vu predictors; learned thresholds, whose per-layer block function must reproduce the
model's own layers of both kinds. Sequences are longer than the sliding window."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import ByteTok

from jaxsparse.calibrate import calibrate
from jaxsparse.config import FULL, SLIDING, ModelConfig
from jaxsparse.evaluate import Evaluator
from jaxsparse.generate import Generator
from jaxsparse.models import build_model, positions_from_mask
from jaxsparse.registry import kernels_for_method

GEMMA = ModelConfig(
    model_type="gemma3_text",
    vocab_size=260,
    hidden_size=32,
    intermediate_size=48,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    sliding_window=6,
    layer_types=(SLIDING, FULL, SLIDING),
    rope_local_theta=100.0,
    query_pre_attn_scalar=12.0,
    tie_word_embeddings=True,
    eos_token_ids=(0,),
)
METHODS = ["cats", "chess", "chess+", "teal"]
SEQ, TOKENS = 32, 1024


def _text(seed: int, n: int = 800) -> str:
    words = ["alpha", "beta", "gamma", "delta", "sparse", "token", "layer", "the", "of", "a"]
    return " ".join(np.random.default_rng(seed).choice(words, n))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, make_params):
    d = tmp_path_factory.mktemp("gemma_corpus")
    (d / "cal.txt").write_text(_text(0))
    (d / "eval.txt").write_text(_text(1))
    params = make_params(GEMMA)
    states = calibrate(
        GEMMA,
        params,
        ByteTok(),
        METHODS,
        [0.5],
        [str(d / "cal.txt")],
        TOKENS,
        SEQ,
        8,
        {"teal": {"allocation": "greedy", "greedy_tokens": 128}},
        progress=False,
    )
    return params, states, d


def test_gate_is_gelu_tanh_of_x_wg():
    """The tapped `gate` (what cats/chess threshold) is gelu_tanh(x Wg): it has negative
    values, unlike SiLU's bounded ones, and matches the formula."""
    from jaxsparse.models import init_params

    params = init_params(GEMMA, seed=0)
    params = jax.tree.map(lambda x: x * 20 if x.ndim == 2 else x, params)
    tokens = jnp.asarray([[5, 6, 7, 8]])
    _, v = build_model(GEMMA).apply(
        {"params": params}, tokens, jnp.arange(4)[None], mutable=["taps"]
    )
    mlp = v["taps"]["layers_1"]["mlp"]
    x = mlp["ffn_in"][0]
    wg = params["layers_1"]["mlp"]["gate_proj"]["kernel"]
    want = jax.nn.gelu(x @ wg, approximate=True)
    np.testing.assert_allclose(mlp["gate"][0], want, rtol=1e-5, atol=1e-6)
    assert float(jnp.min(want)) < -0.1  # gelu's negative lobe: |g| is what is thresholded


def test_measured_sparsity_on_other_text_is_near_target(fitted):
    from jaxsparse.data import pack_tokens, read_documents

    params, states, d = fitted
    ev = Evaluator(GEMMA, params, ByteTok(), SEQ, 8, progress=False)
    tokens = pack_tokens(read_documents([d / "eval.txt"]), ByteTok(), 0, SEQ, 512, "e")
    dense = ev.evaluate(None, tokens.reshape(-1))
    for m in METHODS:
        r = ev.evaluate(states[(m, 0.5)], tokens.reshape(-1))
        pp = r["measured_sparsity"]["per_point"]
        print(m, r["perplexity"], dense["perplexity"], pp)
        assert np.isfinite(r["perplexity"]) and r["perplexity"] != dense["perplexity"]
        if m in ("cats", "chess", "chess+"):
            assert 0.4 <= r["measured_sparsity"]["ffn"] <= 0.6, (m, r["measured_sparsity"])
        if m == "chess+":
            assert 0.4 <= pp["q_in"] <= 0.6 and 0.4 <= pp["o_in"] <= 0.6 and pp["kv_in"] == 0
        if m == "teal":
            assert 0.35 <= 1 - r["activated_params_fraction"] <= 0.65, r


@pytest.mark.parametrize("method", METHODS)
def test_generate_xla_and_kernels_agree(fitted, method):
    """Decoding past the sliding window with each method's state: the Pallas kernels
    (interpret mode) give the masked dense XLA path's tokens."""
    params, states, _ = fitted
    th = states[(method, 0.5)].thresholds_for_model()
    prompts = [list(range(20, 31)), [40, 41, 42]]  # 11 + 8 new tokens > window 6
    ref = Generator(GEMMA, params).generate_ids(prompts, 8, thresholds=th, stop_at_eos=False)
    gen = Generator(GEMMA, params, kernels=kernels_for_method(method, "pallas", "gpu_interpret"))
    got = gen.generate_ids(prompts, 8, thresholds=th, stop_at_eos=False)
    assert got.tokens == ref.tokens
    assert all(len(t) == 8 for t in got.tokens)
    assert 0.2 < ref.measured_sparsity["down_in"] < 0.9  # the thresholds did zero things
    for p, v in ref.measured_sparsity.items():
        assert got.measured_sparsity[p] == pytest.approx(v, abs=1e-6), p


@pytest.mark.slow
def test_dejavu_predictors_generate_and_eval(fitted):
    from jaxsparse.predictors import dejavu_state, gather, train_predictors

    params, _, _ = fitted
    seqs = np.random.default_rng(1).integers(1, GEMMA.vocab_size, (8, SEQ)).astype(np.int32)
    ks = {"ffn_k": 24, "ffn_label_k": 12, "head_k": 2, "head_label_k": 2}
    data = gather(GEMMA, params, seqs, batch_size=4, progress=False)
    weights, _ = train_predictors(
        GEMMA,
        data,
        ks,
        ffn_rank=8,
        head_rank=4,
        steps=20,
        batch_tokens=128,
        eval_every=10,
        progress=False,
    )
    state = dejavu_state(GEMMA, weights, ks["ffn_k"], ks["head_k"])
    th = state.thresholds_for_model()
    prompts = [seqs[0, :9].tolist()]
    ref = Generator(GEMMA, params).generate_ids(prompts, 6, thresholds=th, stop_at_eos=False)
    gen = Generator(GEMMA, params, kernels=kernels_for_method("dejavu", "pallas", "gpu_interpret"))
    got = gen.generate_ids(prompts, 6, thresholds=th, stop_at_eos=False)
    assert got.tokens == ref.tokens
    assert ref.measured_sparsity["gate"] >= 1 - ks["ffn_k"] / 48 - 1e-6
    r = Evaluator(GEMMA, params, ByteTok(), SEQ, 8, progress=False).evaluate(
        state, seqs.reshape(-1)
    )
    assert r["measured_sparsity"]["per_point"]["o_in"] == pytest.approx(0.5, abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["chess", "teal"])
def test_learn_layer_functions_reproduce_the_model_layers(fitted, method):
    """learn's per-layer function for teal (vmapped over both kinds of layers) gives the
    model's own block outputs, so that thresholds are trained against the right target; a
    short training run then works (chess trains the FFN alone)."""
    from jaxsparse.learn import LearnSettings, dense_inputs, learn

    params, states, _ = fitted
    seqs = np.random.default_rng(2).integers(1, GEMMA.vocab_size, (4, 16)).astype(np.int32)
    data = dense_inputs(GEMMA, params, seqs, method)
    _, v = build_model(GEMMA).apply(
        {"params": params},
        jnp.asarray(seqs),
        positions_from_mask(np.ones(seqs.shape, bool)),
        mutable=["taps"],
    )
    for i in range(GEMMA.num_layers - 1):  # block i's output is block i+1's input
        if method == "teal":
            want = np.asarray(v["taps"][f"layers_{i + 1}"]["block_in"][0])
            np.testing.assert_allclose(data["y"][i], want, rtol=1e-4, atol=1e-4)
    state, _ = learn(
        GEMMA,
        params,
        seqs,
        states[(method, 0.5)],
        LearnSettings(method, 0.5, steps=3, batch_tokens=64),
        progress=False,
    )
    assert state.method == f"{method}-learned"
