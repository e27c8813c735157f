"""Deja Vu predictors: a tiny model with learnable activations reaches a recall floor; the
dejavu state round-trips through orbax and drives the model's masks (lookahead); bad
ranks and k's are refused."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import LLAMA, Loaded, pallas_calls

from jaxsparse import sparsity
from jaxsparse.models import build_model, init_params, positions_from_mask
from jaxsparse.predictors import (
    PredictorError,
    check_settings,
    dejavu_state,
    gather,
    heldout_report,
    train_predictors,
    with_operating_point,
)
from jaxsparse.sparsity import StateError, load_state, save_state

# Structured tiny model: large token embeddings and small attention/FFN-output weights, so
# the residual stream stays close to the token's embedding across layers and the FFN's
# important neurons are a (nonlinear) function of the token, visible one block ahead.
TINY = LLAMA.replace(vocab_size=48, intermediate_size=64, num_layers=3)
KS = {"ffn_k": 32, "ffn_label_k": 12, "head_k": 3, "head_label_k": 2}
RECALL_FLOOR = 0.9  # mean held-out FFN recall the tiny model must reach (stated in docs)


def _structured_params(seed=0):
    p = init_params(TINY, seed)
    rng = np.random.default_rng(seed)
    p = jax.tree.map(np.asarray, p)
    p["embed_tokens"]["embedding"] = rng.normal(
        0, 1.0, p["embed_tokens"]["embedding"].shape
    ).astype(np.float32)
    for i in range(TINY.num_layers):
        mlp = p[f"layers_{i}"]["mlp"]
        for k in ("gate_proj", "up_proj"):
            mlp[k]["kernel"] = rng.normal(0, 0.5, mlp[k]["kernel"].shape).astype(np.float32)
    return jax.tree.map(jnp.asarray, p)


@pytest.fixture(scope="module")
def trained():
    params = _structured_params()
    seqs = np.random.default_rng(1).integers(1, TINY.vocab_size, (20, 64)).astype(np.int32)
    data = gather(TINY, params, seqs, batch_size=4, progress=False)
    weights, report = train_predictors(
        TINY,
        data,
        KS,
        ffn_rank=16,
        head_rank=8,
        steps=300,
        batch_tokens=256,
        lr=1e-2,
        eval_every=50,
        patience=3,
        progress=False,
    )
    return params, seqs, data, weights, report


def test_gather_shapes_and_lookahead(trained):
    params, seqs, data, _, _ = trained
    n = seqs.size
    assert data["x"].shape == (TINY.num_layers, n, TINY.hidden_size)
    assert data["ffn_importance"].shape == (TINY.num_layers, n, TINY.intermediate_size)
    assert data["head_norm"].shape == (TINY.num_layers, n, TINY.num_heads)
    # layer 0 sees its own input (the embeddings), layer l the input of block l-1
    emb = np.asarray(params["embed_tokens"]["embedding"])[seqs.reshape(-1)]
    np.testing.assert_allclose(data["x"][0], emb, rtol=1e-6)
    np.testing.assert_array_equal(data["x"][1], data["x"][0])
    assert not np.array_equal(data["x"][2], data["x"][1])


def test_predictors_reach_the_recall_floor(trained):
    *_, report = trained
    mean = report["mean"]
    assert mean["ffn_recall"] >= RECALL_FLOOR, report["mean"]
    assert mean["predicted_sparsity"] == pytest.approx(1 - KS["ffn_k"] / 64)
    # far above chance: a random top-32 of 64 recalls half the labels
    assert min(v["ffn_recall"] for v in report["per_layer"].values()) > 0.7
    assert report["heldout_tokens"] > 0 and report["train_tokens"] > report["heldout_tokens"]
    # early stopping: the kept weights are the best evaluated on the validation split
    assert report["trace"] and report["trace"][-1]["ffn_recall"] == pytest.approx(
        report["validation"]["ffn_recall"]
    )


def test_report_is_on_a_third_split(trained):
    """Three disjoint splits: the report is measured on the last sequences, which neither
    training nor early stopping used."""
    _, seqs, data, weights, report = trained
    n_seq, t = seqs.shape
    assert report["train_tokens"] + report["heldout_tokens"] + report["test_tokens"] == seqs.size
    n_test = report["test_sequences"]
    test = {k: data[k][:, (n_seq - n_test) * t :] for k in ("x", "ffn_importance", "head_norm")}
    want = heldout_report(TINY, weights, test, KS)
    for k, v in want["mean"].items():
        assert report["mean"][k] == pytest.approx(v, abs=1e-9), k
    # and it is not the early-stopping split's number
    val_start = (n_seq - n_test - report["heldout_sequences"]) * t
    val = {k: data[k][:, val_start : (n_seq - n_test) * t] for k in test}
    assert heldout_report(TINY, weights, val, KS)["mean"]["ffn_recall"] == pytest.approx(
        report["validation"]["ffn_recall"], abs=1e-9
    )
    assert report["mean"]["ffn_recall"] != report["validation"]["ffn_recall"]


def test_untrained_predictors_are_near_chance(trained):
    from jaxsparse.predictors import init_predictors

    *_, data, _, _ = trained
    w = jax.tree.map(np.asarray, init_predictors(TINY, 16, 8, seed=3))
    rep = heldout_report(TINY, w, data, KS)
    assert rep["mean"]["ffn_recall"] < 0.75  # so the floor above is earned by training


def test_state_roundtrip_and_model_masks(trained, tmp_path):
    params, seqs, _, weights, _ = trained
    state = dejavu_state(TINY, weights, KS["ffn_k"], KS["head_k"])
    save_state(state, tmp_path / "dv")
    loaded = load_state(tmp_path / "dv", TINY)
    assert loaded.method == "dejavu" and loaded.target_sparsity == pytest.approx(0.5)
    for layer, w in state.predictors.items():
        for k, v in w.items():
            np.testing.assert_array_equal(loaded.predictors[layer][k], v)
    model = build_model(TINY)
    tokens = jnp.asarray(seqs[:2])
    pos = positions_from_mask(jnp.ones(tokens.shape, bool))
    (logits, _), v = model.apply(
        {"params": params},
        tokens,
        pos,
        thresholds=loaded.thresholds_for_model(),
        mutable=["stats", "taps"],
    )
    for i in range(TINY.num_layers):
        s = v["stats"][f"layers_{i}"]
        gate_zero = np.asarray(s["mlp"]["gate"][0])
        assert gate_zero.min() >= 1 - KS["ffn_k"] / 64 - 1e-6
        o_zero = np.asarray(s["self_attn"]["o_in"][0])
        np.testing.assert_allclose(o_zero, 1 - KS["head_k"] / TINY.num_heads, atol=1e-6)
    # the masks come from the residual entering the previous block (lookahead)
    from jaxsparse.models.predictor import predicted_masks

    taps = v["taps"]
    x_prev = taps["layers_1"]["block_in"][0]
    ffn_keep, _ = predicted_masks(jax.tree.map(jnp.asarray, loaded.predictors["layers_2"]), x_prev)
    raw = taps["layers_2"]["mlp"]["gate"][0]
    zeroed = np.asarray(v["stats"]["layers_2"]["mlp"]["gate"][0])
    expect = 1 - np.mean(np.asarray(ffn_keep & (raw != 0)), axis=-1)
    np.testing.assert_allclose(zeroed, expect, atol=1e-6)
    # keeping every neuron and head is the dense model
    dense_op = with_operating_point(loaded, 64, TINY.num_heads)
    (full, _) = model.apply(
        {"params": params}, tokens, pos, thresholds=dense_op.thresholds_for_model()
    )
    (dense, _) = model.apply({"params": params}, tokens, pos)
    np.testing.assert_allclose(np.asarray(full), np.asarray(dense), rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(logits), np.asarray(dense), atol=1e-3)


def test_bad_ranks_and_ks_are_refused(trained, tmp_path):
    *_, data, weights, _ = trained
    with pytest.raises(PredictorError, match=r"--ffn-rank 33: .*\[1, 32\]"):
        check_settings(TINY, 33, 8, **KS)
    with pytest.raises(PredictorError, match="--head-rank 0"):
        check_settings(TINY, 8, 0, **KS)
    with pytest.raises(PredictorError, match=r"--ffn-k 65: outside \[1, 64\]"):
        check_settings(TINY, 8, 8, **{**KS, "ffn_k": 65})
    with pytest.raises(PredictorError, match=r"--ffn-k 0"):
        check_settings(TINY, 8, 8, **{**KS, "ffn_k": 0})
    with pytest.raises(PredictorError, match=r"--head-k 5: outside \[1, 4\]"):
        check_settings(TINY, 8, 8, **{**KS, "head_k": 5})
    with pytest.raises(PredictorError, match="--ffn-rank 40"):
        train_predictors(TINY, data, KS, ffn_rank=40, steps=1, progress=False)
    with pytest.raises(PredictorError):
        with_operating_point(dejavu_state(TINY, weights, 32, 3), ffn_k=100)
    # a stored state with a k out of range is refused at load
    state = dejavu_state(TINY, weights, 32, 3)
    bad = {layer: {**w, "ffn_k": np.asarray(0, np.int32)} for layer, w in state.predictors.items()}
    with pytest.raises(StateError, match=r"ffn_k = 0 is outside \[1, 64\]"):
        state.replace(predictors=bad).check_model(TINY)


def test_cli_rejects_bad_rank_before_training(tmp_path, capsys):
    from jaxsparse.cli import main

    rc = main(["train-predictors", "--ffn-rank", "100000", "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "--ffn-rank 100000" in capsys.readouterr().err
    rc = main(["train-predictors", "--ffn-k", "100000", "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "--ffn-k 100000: outside" in capsys.readouterr().err


def test_sweep_and_eval_take_dejavu_and_learned_states(trained, tmp_path):
    import json

    from jaxsparse.learn import LearnSettings, learn
    from jaxsparse.sparsity import make_state
    from jaxsparse.sweep import sweep

    params, seqs, _, weights, _ = trained

    class ByteTok:
        eos_token_id = 0

        def encode(self, text, add_special_tokens=False):
            return [b % 40 + 1 for b in text.encode()]

    save_state(dejavu_state(TINY, weights, 32, 3), tmp_path / "dv")
    init = make_state(TINY, "chess", 0.5, {f"layers_{i}": {"gate": 0.05} for i in range(3)})
    learned, _ = learn(
        TINY, params, seqs, init, LearnSettings("chess", 0.5, steps=3), progress=False
    )
    save_state(learned, tmp_path / "cl")
    (tmp_path / "ev.txt").write_text("alpha beta gamma delta " * 40)
    out = tmp_path / "sweep"
    results = sweep(
        Loaded(TINY, params, ByteTok(), "tiny-structured"),
        ["cats"],
        [0.3],
        out,
        ev={
            "seq_len": 64,
            "batch_size": 4,
            "ppl": [str(tmp_path / "ev.txt")],
            "tasks": None,
            "max_tokens": 0,
        },
        data=[str(tmp_path / "ev.txt")],
        calib={"tokens": 512, "seq_len": 64, "batch_size": 4},
        progress=False,
        extra_states=[str(tmp_path / "dv"), str(tmp_path / "cl")],
    )
    assert [r["method"] for r in results] == ["dense", "cats", "dejavu", "chess-learned"]
    dv = results[2]
    assert dv["measured_sparsity"]["ffn"] >= 0.5 - 1e-6
    assert dv["measured_sparsity"]["per_point"]["o_in"] == pytest.approx(0.25, abs=1e-6)
    assert abs(results[3]["measured_sparsity"]["ffn"] - 0.5) < 0.15
    rows = json.loads((out / "table.json").read_text())
    assert len(rows) == 4


@pytest.mark.parametrize("impl", ["xla", "gpu_interpret"])
def test_generate_decodes_with_a_dejavu_state(trained, impl):
    """`Generator` (what `jaxsparse generate --sparsity-state` runs) takes a dejavu state;
    through the kernels (interpret mode) it gives the masked dense path's tokens."""
    from jaxsparse.generate import Generator
    from jaxsparse.registry import kernels_for_method

    params, seqs, _, weights, _ = trained
    state = dejavu_state(TINY, weights, KS["ffn_k"], KS["head_k"])
    th = state.thresholds_for_model()
    prompts = [seqs[0, :7].tolist(), seqs[1, :3].tolist()]
    ref = Generator(TINY, params).generate_ids(prompts, 5, thresholds=th, stop_at_eos=False)
    mode = "xla" if impl == "xla" else "pallas"
    gen = Generator(TINY, params, kernels=kernels_for_method("dejavu", mode, impl))
    got = gen.generate_ids(prompts, 5, thresholds=th, stop_at_eos=False)
    assert got.tokens == ref.tokens
    assert got.measured_sparsity["gate"] >= 1 - KS["ffn_k"] / 64 - 1e-6


def test_decode_layout_gives_the_same_masks(trained, monkeypatch):
    """`decode_layout` (W1 stored [r, d] for the decode loop) leaves the predictors'
    logits and masks as they were, and the Generator's decode loop runs with it (the
    prefill keeps [d, r])."""
    from jaxsparse.generate import Generator
    from jaxsparse.models import predictor

    params, seqs, _, weights, _ = trained
    th = dejavu_state(TINY, weights, KS["ffn_k"], KS["head_k"]).thresholds_for_model()
    moved = predictor.decode_layout(th)
    assert predictor.decode_layout(None) is None
    x = jax.random.normal(jax.random.key(0), (3, 1, TINY.hidden_size))
    for name in th:
        w, wt = th[name]["predictor"], moved[name]["predictor"]
        assert "ffn_w1" not in wt and wt["ffn_w1t"].shape == w["ffn_w1"].shape[::-1]
        for which in ("ffn", "head"):
            np.testing.assert_allclose(
                predictor.predictor_logits(wt, x, which),
                predictor.predictor_logits(w, x, which),
                rtol=1e-5,
                atol=1e-5,
            )
        for a, b in zip(predictor.predicted_masks(wt, x), predictor.predicted_masks(w, x)):
            np.testing.assert_array_equal(a, b)
    assert sparsity.predictor_weights(moved["layers_0"]["predictor"]) == (
        sparsity.predictor_weights(th["layers_0"]["predictor"])
    )
    layouts = []
    real = predictor.predictor_logits

    def spy(w, x, which):
        layouts.append((x.shape[-2], f"{which}_w1t" in w))
        return real(w, x, which)

    monkeypatch.setattr(predictor, "predictor_logits", spy)
    Generator(TINY, params).generate_ids([seqs[0, :5].tolist()], 3, thresholds=th)
    assert {t for t, transposed in layouts if transposed} == {1}  # the decode steps
    assert any(not transposed for _, transposed in layouts)  # the prefill keeps [d, r]


def test_dejavu_decode_step_kernels(trained):
    """Which projections a Deja Vu pallas decode step runs through the kernels, read off
    its jaxpr: q of the selected heads, k|v of every head (a dense input through
    `sparse_input_matvec`: `registry.DENSE_KERNEL_POINTS`), the heads' attention, o, then
    gate and up rows of the predicted neurons and down."""
    from jaxsparse.models import init_cache, prepare_params
    from jaxsparse.registry import kernels_for_method

    params, _, _, weights, _ = trained
    th = dejavu_state(TINY, weights, KS["ffn_k"], KS["head_k"]).thresholds_for_model()
    kn = kernels_for_method("dejavu", "pallas", "gpu_interpret")
    model = build_model(TINY, kn)
    p = prepare_params(params, TINY, kn)
    cache = init_cache(TINY, 1, 8)
    tok, pos = jnp.ones((1, 1), jnp.int32), jnp.full((1, 1), 3)
    jaxpr = jax.make_jaxpr(lambda p, t: model.apply({"params": p}, tok, pos, cache, 3, t))(p, th)
    names = [n.removesuffix("_splitk") for n in pallas_calls(jaxpr.jaxpr)]
    per_layer = ["gated_matvec", "sparse_input_matvec", "head_sparse_attention"]
    per_layer += ["sparse_input_matvec", "gated_matvec", "gated_matvec", "sparse_input_matvec"]
    assert names == per_layer * TINY.num_layers


def test_dejavu_kernel_decode_skips_gate_rows(trained, monkeypatch, fresh_block_traces):
    """In a pallas decode step gate_proj is stored [m, d] and computed by `gated_matvec`
    with the neuron mask as its gate (only predicted-active rows read), as up_proj is; the
    tokens equal the masked XLA path's."""
    import pallas_kernels
    from jaxsparse.models import init_cache, prepare_params
    from jaxsparse.registry import kernels_for_method

    params, seqs, _, weights, _ = trained
    th = dejavu_state(TINY, weights, KS["ffn_k"], KS["head_k"]).thresholds_for_model()
    kn = kernels_for_method("dejavu", "pallas", "gpu_interpret")
    assert kn.gate_rows and kn.up_rows
    p_k = prepare_params(params, TINY, kn)
    m, d = TINY.intermediate_size, TINY.hidden_size
    assert p_k["layers_0"]["mlp"]["gate_proj"]["kernel"].shape == (m, d)
    calls = []
    real = pallas_kernels.gated_matvec

    def spy(x, g, w, **kw):  # records each call as it runs (the blocks are jitted)
        shape = tuple(w.shape)
        jax.debug.callback(lambda gv: calls.append((shape, np.asarray(gv))), g, ordered=True)
        return real(x, g, w, **kw)

    monkeypatch.setattr(pallas_kernels, "gated_matvec", spy)
    xla = kernels_for_method("dejavu", "xla")
    models = {
        "xla": (build_model(TINY, xla), prepare_params(params, TINY, xla)),
        "pallas": (build_model(TINY, kn), p_k),
    }
    prompt = jnp.asarray(seqs[:2, :6])
    pos = positions_from_mask(jnp.ones(prompt.shape, bool))
    out = {}
    for name, (model, p) in models.items():
        cache = init_cache(TINY, 2, 16)
        logits, cache = model.apply({"params": p}, prompt, pos, cache, 0, th)
        toks, tok = [], jnp.argmax(logits[:, -1], -1)[:, None]
        for step in range(4):
            toks.append(np.asarray(tok[:, 0]))
            logits, cache = model.apply(
                {"params": p}, tok, jnp.full((2, 1), 6 + step), cache, 6 + step, th
            )
            tok = jnp.argmax(logits[:, -1], -1)[:, None]
        out[name] = (np.stack(toks), np.asarray(logits))
    np.testing.assert_array_equal(out["pallas"][0], out["xla"][0])
    np.testing.assert_allclose(out["pallas"][1], out["xla"][1], rtol=2e-4, atol=2e-4)
    # per decode step and layer: gate_proj and up_proj ([m, d] each) through the kernel,
    # gate_proj's gate being the 0/1 neuron mask of ffn_k active rows
    jax.effects_barrier()  # the callbacks run asynchronously: wait for all of them
    per_step = [c for c in calls if c[0] == (m, d)]
    assert len(per_step) == 4 * 2 * TINY.num_layers
    masks = [np.asarray(g) for _, g in per_step[0::2]]
    assert all(
        set(np.unique(mk)) <= {0.0, 1.0} and (mk != 0).sum(-1).max() <= KS["ffn_k"] for mk in masks
    )


def test_dejavu_activated_params_counts_predictors_and_skipped_rows(trained):
    """Deja Vu's activated params: gate/up/down only the kept neurons' rows, q and o only
    the selected heads' (the kernel path reads no more: tests above), k/v every head's,
    plus the predictors' own weights."""
    from jaxsparse.evaluate import Evaluator
    from jaxsparse.sparsity import linear_sizes, predictor_weights

    params, seqs, _, weights, _ = trained
    state = dejavu_state(TINY, weights, KS["ffn_k"], KS["head_k"])

    class Tok:
        pass

    r = Evaluator(TINY, params, Tok(), 64, 4, progress=False).evaluate(state, seqs[:4].ravel())
    s = linear_sizes(TINY)
    keep, heads = KS["ffn_k"] / TINY.intermediate_size, KS["head_k"] / TINY.num_heads
    pred = predictor_weights(state.predictors["layers_0"])
    assert pred == 32 * 16 + 16 * 64 + 32 * 8 + 8 * 4  # W1 and W2 of both predictors
    want = (
        s["q_proj"] * heads
        + s["k_proj"]
        + s["v_proj"]
        + s["o_proj"] * heads
        + (s["gate_proj"] + s["up_proj"] + s["down_proj"]) * keep
        + pred
    ) / sum(s.values())
    assert r["activated_params_fraction"] == pytest.approx(want, rel=1e-5)
