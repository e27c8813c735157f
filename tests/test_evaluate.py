"""Evaluation: perplexity and harness-style task scoring against direct computations,
measured sparsity and activated parameters against their formulas, one vs two devices."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import LLAMA, ByteTok

from jaxsparse import rules
from jaxsparse.data import Task
from jaxsparse.evaluate import _POINTS, Evaluator, linear_sizes
from jaxsparse.models import build_model, init_params, positions_from_mask
from jaxsparse.sparsity import dense_state, make_state

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    params = init_params(LLAMA, 3)
    return (
        LLAMA,
        params,
        Evaluator(LLAMA, params, ByteTok(), seq_len=16, batch_size=4, progress=False),
    )


@functools.cache
def _log_probs_fn(config):
    m = build_model(config)

    @jax.jit
    def run(params, t):
        logits, _ = m.apply({"params": params}, t, positions_from_mask(jnp.ones(t.shape, bool)))
        return jax.nn.log_softmax(logits[0].astype(jnp.float32))

    return run


def _log_probs(config, params, tokens):
    return np.asarray(_log_probs_fn(config)(params, jnp.asarray(tokens)[None]), np.float64)


def test_points_match_rules():
    assert _POINTS == rules.TENSORS


def test_perplexity_equals_direct_computation(model):
    config, params, ev = model
    ids = np.arange(1, 41, dtype=np.int32) % 250 + 1  # 40 tokens: windows 16, 16, 8
    r = ev.evaluate(None, ids)
    nll, n = 0.0, 0
    for start in range(0, 40, 16):
        w = ids[start : start + 16]
        lp = _log_probs(config, params, w)
        nll -= sum(lp[t, w[t + 1]] for t in range(len(w) - 1))
        n += len(w) - 1
    assert r["perplexity_tokens"] == n == 37 and r["windows"] == 3
    assert r["perplexity"] == pytest.approx(np.exp(nll / n), rel=1e-5)
    assert r["tokens"] == 40 and r["activated_params_fraction"] == pytest.approx(1.0)
    assert r["measured_sparsity"]["ffn"] < 0.01


def test_tasks_scored_as_the_harness_does(model):
    config, params, _ = model
    ev = Evaluator(config, params, ByteTok(), seq_len=64, batch_size=4, progress=False)
    tasks = [
        Task("The cat sat on the ", ("mat", "roof", "a long answer here"), 0),
        Task("", ("abc", "x"), 1),
    ]
    rows, cont_lens = ev.encode_task_choices(tasks)
    tok = ByteTok()
    # trailing space of the context moves to the continuation
    assert list(rows[0]) == tok.encode("The cat sat on the mat")
    assert cont_lens[0] == len(tok.encode(" mat"))
    # empty context: EOS as the context
    assert list(rows[3]) == [0] + tok.encode("abc")
    lls = []
    for row, c in zip(rows, cont_lens):
        lp = _log_probs(config, params, row)
        lls.append(sum(lp[t - 1, row[t]] for t in range(len(row) - c, len(row))))
    want_acc = (int(np.argmax(lls[:3]) == 0) + int(np.argmax(lls[3:]) == 1)) / 2
    byte_lens = [3, 4, 18, 3, 1]  # the choices as given (not the moved space)
    norm = [ll / b for ll, b in zip(lls, byte_lens)]
    want_norm = (int(np.argmax(norm[:3]) == 0) + int(np.argmax(norm[3:]) == 1)) / 2
    result = ev.evaluate(None, tasks=tasks)
    r = result["tasks"]
    assert r["acc"] == want_acc and r["acc_norm"] == want_norm and r["n"] == 2
    assert r["acc_stderr"] == pytest.approx(np.sqrt(want_acc * (1 - want_acc) / 2))
    assert r["acc_norm_stderr"] == pytest.approx(np.sqrt(want_norm * (1 - want_norm) / 2))
    assert result["dtype"] == config.dtype
    # a sequence longer than seq_len keeps its last tokens (the continuation must fit)
    short = Evaluator(config, params, ByteTok(), seq_len=16, batch_size=4, progress=False)
    rows, cont_lens = short.encode_task_choices([Task(tasks[0].context, ("mat", "roof"), 0)])
    assert list(rows[0]) == tok.encode("The cat sat on the mat")[-16:]
    with pytest.raises(ValueError, match="does not fit --seq-len 16"):
        short.encode_task_choices([Task("ctx", ("x" * 20, "y"), 0)])


def _reference_zero_fractions(config, params, tokens, thresholds):
    m = build_model(config)
    t = jnp.asarray(tokens)
    _, v = m.apply(
        {"params": params},
        t,
        positions_from_mask(jnp.ones(t.shape, bool)),
        thresholds=thresholds,
        mutable=["stats"],
    )
    out = {}
    for i in range(config.num_layers):
        s = v["stats"][f"layers_{i}"]
        out[i] = {
            p: np.asarray(
                (s["self_attn"] if p in ("q_in", "kv_in", "o_in") else s["mlp"])[p][0], np.float64
            )
            for p in _POINTS
        }
    return out


def test_measured_sparsity_and_activated_params(model):
    config, params, ev = model
    rng = np.random.default_rng(0)
    values = {
        f"layers_{i}": {
            "q_in": 0.01,
            "kv_in": 0.005,
            "o_in": 0.002,
            "ffn_in": 0.01,
            "gate": rng.uniform(0, 0.002, config.intermediate_size),
            "down_in": 1e-5,
        }
        for i in range(2)
    }
    state = make_state(config, "test", 0.5, values)
    tokens = rng.integers(1, 250, (4, 16)).astype(np.int32)
    r = ev.evaluate(state, tokens.reshape(-1))
    z = _reference_zero_fractions(config, params, tokens, state.thresholds_for_model())
    sizes = linear_sizes(config)
    total = sum(sizes.values()) * config.num_layers
    read = np.zeros(tokens.shape)
    for i in range(config.num_layers):
        d = {p: 1 - z[i][p] for p in _POINTS}
        for p in _POINTS:
            assert r["measured_sparsity"]["per_layer"][f"layers_{i}"][p] == pytest.approx(
                z[i][p].mean(), abs=1e-6
            )
            assert 0 < z[i][p].mean() < 1
        read += (
            sizes["q_proj"] * d["q_in"]
            + (sizes["k_proj"] + sizes["v_proj"]) * d["kv_in"]
            + sizes["o_proj"] * d["o_in"]
            + sizes["gate_proj"] * d["ffn_in"]
            + sizes["up_proj"] * d["ffn_in"] * d["gate"]
            + sizes["down_proj"] * d["down_in"]
        )
    assert r["activated_params_fraction"] == pytest.approx(read.mean() / total, rel=1e-5)
    assert r["measured_sparsity"]["ffn"] == pytest.approx(
        np.mean([z[i]["gate"].mean() for i in range(2)]), abs=1e-6
    )
    assert np.mean(list(r["activated_params_per_layer"].values())) == pytest.approx(
        r["activated_params_fraction"], rel=1e-6
    )


def test_padding_is_excluded(model):
    ev = model[2]
    # 20 tokens: a full window and a 4-token one, padded to 16 in its batch row
    ids = np.arange(1, 21, dtype=np.int32)
    r = ev.evaluate(None, ids)
    assert r["tokens"] == 20 and r["perplexity_tokens"] == 18


def test_fewer_rows_than_a_batch_are_not_padded_to_it(model):
    """2 windows with batch_size 4 run as one batch of 2 rows (the 2 padding rows would be
    computed and thrown away), with the result of a batch of 4; 5 task rows run in batches
    of 4 (the batch size is a cap, not a target)."""
    config, params, ev = model
    shapes = []

    def spy(p, tokens, valid, thresholds):
        shapes.append(tuple(tokens.shape))
        return ev.forward(p, tokens, valid, thresholds)

    small = Evaluator(config, params, ByteTok(), seq_len=16, batch_size=4, progress=False)
    small.forward = spy
    ids = np.arange(1, 33, dtype=np.int32)  # 2 full windows
    tasks = [Task("a b", (" c", " d", " e"), 0), Task("x", (" y", " z"), 1)]
    r = small.evaluate(None, ids, tasks)
    assert shapes == [(2, 16), (4, 16), (4, 16)]
    padded = ev.forward(
        ev.params,
        jnp.asarray(np.concatenate([ids.reshape(2, 16), np.zeros((2, 16), np.int32)])),
        jnp.asarray(np.arange(4)[:, None] < np.full((4, 16), 2)),
        ev._thresholds(None),
    )
    nll = -float(np.asarray(padded["next_ll"])[:2, :15].sum(dtype=np.float64)) / 30
    assert r["perplexity"] == pytest.approx(np.exp(nll), rel=1e-5)
    assert r["perplexity"] == pytest.approx(ev.evaluate(None, ids)["perplexity"], rel=1e-6)


def test_state_for_another_model_is_refused(model):
    config, _, ev = model
    with pytest.raises(ValueError, match="calibrated for another model"):
        ev.evaluate(dense_state(config.replace(intermediate_size=64)), np.arange(1, 10))


_TWO_DEVICE_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from jaxsparse.config import ModelConfig
    from jaxsparse.data import Task
    from jaxsparse.evaluate import Evaluator
    from jaxsparse.models import init_params
    from jaxsparse.sparsity import make_state

    class ByteTok:
        eos_token_id = 0
        def encode(self, text, add_special_tokens=False):
            return [b + 1 for b in text.encode()]

    c = ModelConfig(model_type="llama", vocab_size=260, hidden_size=32, intermediate_size=48,
                    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, eos_token_ids=(0,))
    p = init_params(c, 3)
    st = make_state(c, "cats", 0.5, {f"layers_{i}": {"gate": 0.001, "q_in": 0.01}
                                     for i in range(2)})
    ev = Evaluator(c, p, ByteTok(), seq_len=16, batch_size=3, progress=False)
    ids = np.arange(1, 101, dtype=np.int32)
    tasks = [Task("a b c", (" d", " e", " f"), 0), Task("x y", (" z", " w"), 1)]
    r = ev.evaluate(st, ids, tasks)
    print(json.dumps({"devices": len(jax.devices()), "batch": ev.batch_size,
                      "ppl": r["perplexity"], "acc": r["tasks"]["acc"],
                      "ffn": r["measured_sparsity"]["ffn"],
                      "act": r["activated_params_fraction"], "tokens": r["tokens"]}))
""")


@pytest.mark.slow
def test_two_devices_give_the_same_result_as_one():
    out = {}
    for n in (1, 2):
        env = {
            **os.environ,
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}",
            "PYTHONPATH": str(REPO),
            "JAX_PLATFORMS": "cpu",
        }
        p = subprocess.run(
            [sys.executable, "-c", _TWO_DEVICE_SCRIPT],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert p.returncode == 0, p.stderr[-3000:]
        out[n] = json.loads(p.stdout.strip().splitlines()[-1])
    assert out[1]["devices"] == 1 and out[2]["devices"] == 2
    assert out[2]["batch"] == 4  # rounded up to a multiple of the devices
    for k in ("ppl", "ffn", "act"):
        assert out[2][k] == pytest.approx(out[1][k], rel=1e-5), k
    assert out[2]["acc"] == out[1]["acc"] and out[2]["tokens"] == out[1]["tokens"] == 100 + 21 + 10


@pytest.mark.slow
def test_eval_cli_on_smollm2(smollm2, tmp_path):
    """The CLI end to end on the default model with a small perplexity file and tasks."""
    from jaxsparse.cli import main

    (tmp_path / "t.txt").write_text("Return the sum of the two arguments. " * 20)
    (tmp_path / "tasks.jsonl").write_text(
        json.dumps(
            {"context": "The capital of France is", "choices": [" Paris", " banana"], "gold": 0}
        )
        + "\n"
    )
    out = tmp_path / "r.json"
    # the shapes of test_calibrate's SmolLM2 evaluation: the compiled forward is reused
    rc = main(
        [
            "eval",
            "--ppl",
            str(tmp_path / "t.txt"),
            "--tasks",
            str(tmp_path / "tasks.jsonl"),
            "--seq-len",
            "256",
            "--batch-size",
            "8",
            "--json",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    r = json.loads(out.read_text())
    for key in ("perplexity", "tokens", "method", "target_sparsity", "activated_params_fraction"):
        assert key in r
    assert r["method"] == "dense" and r["perplexity"] < 20
    assert r["tasks"]["acc"] == 1.0 and "acc_norm" in r["tasks"]
    assert set(r["measured_sparsity"]) >= {"ffn", "per_layer"}
    assert len(r["measured_sparsity"]["per_layer"]) == smollm2.config.num_layers
    # a bad tasks file is named with its line
    (tmp_path / "bad.jsonl").write_text('{"context": "a", "choices": ["b"], "gold": 0}\n')
    rc = main(["eval", "--tasks", str(tmp_path / "bad.jsonl"), "--json", str(out)])
    assert rc != 0


def test_paired_difference_of_two_results(model):
    """Results carry each window's summed NLL (they add up to the perplexity's); a result
    paired with itself differs by exactly zero, a sparse state from dense by an interval
    around its difference; results on other windows, or without windows, are refused."""
    from jaxsparse.evaluate import paired_difference

    config, _, ev = model
    ids = np.arange(1, 81, dtype=np.int32) % 250 + 1  # 80 tokens: 5 windows of 16
    dense = ev.evaluate(None, ids)
    assert len(dense["window_nll"]) == dense["windows"] == 5
    assert sum(dense["window_tokens"]) == dense["perplexity_tokens"]
    assert np.exp(sum(dense["window_nll"]) / dense["perplexity_tokens"]) == pytest.approx(
        dense["perplexity"], rel=1e-12
    )
    same = paired_difference(dense, dense, resamples=200)
    assert same["ppl_b_minus_a"] == 0.0 and same["interval95"] == [0.0, 0.0]
    values = {f"layers_{i}": {"q_in": 0.5, "ffn_in": 0.5} for i in range(config.num_layers)}
    sparse = ev.evaluate(make_state(config, "test", 0.5, values), ids)
    d = paired_difference(dense, sparse, resamples=2000)
    assert d["ppl_b_minus_a"] == pytest.approx(sparse["perplexity"] - dense["perplexity"])
    assert d["ppl_b_minus_a"] != 0.0
    lo, hi = d["interval95"]
    assert lo <= d["ppl_b_minus_a"] <= hi and lo < hi
    with pytest.raises(ValueError, match="same windows"):
        paired_difference(dense, ev.evaluate(None, ids[:64]))
    with pytest.raises(ValueError, match="no per-window perplexity"):
        paired_difference({k: v for k, v in dense.items() if k != "window_nll"}, dense)
