"""Deja Vu head sparsity through the kernels (each `impl` under test, see conftest.py): the
model's decode step runs q, attention and o for the predicted heads only
(`head_sparse_attention` on the [B, Hkv, S, Dh] cache) and gives the masked dense XLA
path's logits and greedy tokens (tiny config and SmolLM2)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from jaxsparse.config import ModelConfig
from jaxsparse.generate import Generator
from jaxsparse.models import (
    build_model,
    init_cache,
    init_params,
    prepare_params,
)
from jaxsparse.predictors import dejavu_state, init_predictors
from jaxsparse.registry import kernels_for_method

pytestmark = pytest.mark.usefixtures("full_precision")  # tests/conftest.py

TINY = ModelConfig(
    model_type="llama",
    vocab_size=64,
    hidden_size=64,
    intermediate_size=96,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    eos_token_ids=(0,),
)


def _dejavu(config, head_k: int, ffn_k: int | None = None, seed: int = 0):
    """A dejavu state with random (untrained) predictors: top-k of their logits picks the
    heads; parity with the masked dense path does not depend on what they predict."""
    weights = init_predictors(config, ffn_rank=8, head_rank=8, seed=seed)
    weights = {k: np.asarray(v) for k, v in weights.items()}
    ffn_k = config.intermediate_size if ffn_k is None else ffn_k
    return dejavu_state(config, weights, ffn_k, head_k).thresholds_for_model()


@pytest.fixture
def head_calls(monkeypatch, fresh_block_traces):
    """Counts the model's calls of `pallas_kernels.head_sparse_attention` as they run (and
    the heads it was asked for), so a test can tell that the kernel path really ran.
    Returns a function giving the calls so far: debug callbacks run asynchronously, so it
    waits for them first (`jax.effects_barrier`); reading the list right after the step
    was dispatched missed the second layer's call under load."""
    calls = []
    real = pallas_kernels.head_sparse_attention

    def counting(q, heads_BxH, *args, **kw):
        info = (tuple(heads_BxH.shape), kw.get("impl"))
        jax.debug.callback(lambda: calls.append(info))
        return real(q, heads_BxH, *args, **kw)

    monkeypatch.setattr(pallas_kernels, "head_sparse_attention", counting)

    def recorded() -> list:
        jax.effects_barrier()
        return list(calls)

    return recorded


def _decode_step_logits(config, params, kernels, thresholds, prompt_BxT):
    """Dense prefill with a cache, then one decode step with `thresholds`: its logits and
    its per-point sparsity stats."""
    logits, stats, _ = _decode_step(config, params, kernels, thresholds, prompt_BxT)
    return logits, stats


def _decode_step(config, params, kernels, thresholds, prompt_BxT):
    """`_decode_step_logits`, plus the cache after the decode step."""
    model = build_model(config, kernels)
    p = prepare_params(params, config, kernels)
    b, t = prompt_BxT.shape
    cache = init_cache(config, b, 16)
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    _, cache = model.apply({"params": p}, prompt_BxT, pos, cache=cache, cache_index=0)
    nxt = jnp.asarray([[7]] * b)
    (logits, cache), vs = model.apply(
        {"params": p},
        nxt,
        jnp.full((b, 1), t),
        cache=cache,
        cache_index=t,
        thresholds=thresholds,
        mutable=["stats"],
    )
    return logits[:, -1], vs["stats"], cache


@pytest.mark.slow
def test_decode_step_matches_masked_dense(impl, head_calls):
    params = jax.tree.map(lambda x: x * 8, init_params(TINY, seed=5))  # attention matters
    th = _dejavu(TINY, head_k=2)
    prompt = jnp.asarray([[3, 4, 5, 6, 9], [11, 12, 13, 14, 15]])
    want, want_stats = _decode_step_logits(
        TINY, params, kernels_for_method("dejavu", "xla"), th, prompt
    )
    # on a GPU the XLA step calls the kernel too, for every head (`Kernels.decode_attention`)
    before = len(head_calls())
    got, stats = _decode_step_logits(
        TINY, params, kernels_for_method("dejavu", "pallas", impl), th, prompt
    )
    # one call per layer, [B, H]
    assert head_calls()[before:] == [((2, 4), impl)] * TINY.num_layers
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=2e-4)
    for i in range(TINY.num_layers):  # half the heads' o inputs are zero, on both paths
        o_zero = stats[f"layers_{i}"]["self_attn"]["o_in"][0]
        np.testing.assert_allclose(np.asarray(o_zero), 0.5, atol=1e-6)
        want_zero = want_stats[f"layers_{i}"]["self_attn"]["o_in"][0]
        np.testing.assert_allclose(np.asarray(o_zero), np.asarray(want_zero))
    # the selected heads matter: all heads selected gives other logits
    dense, _ = _decode_step_logits(
        TINY, params, kernels_for_method("dejavu", "xla"), _dejavu(TINY, head_k=4), prompt
    )
    assert float(jnp.max(jnp.abs(dense - want))) > 1e-2


@pytest.mark.slow
def test_kv_written_for_every_kv_head(head_calls):
    """A kernel decode step with one of 4 query heads selected per row (so one of the 2 kv
    heads is read by no selected head) still computes K/V for every kv head and writes
    them to the cache: a head selected at a later step finds it complete. The new slot
    must equal the masked dense XLA step's (which computes every head) and not be zero."""
    params = jax.tree.map(lambda x: x * 8, init_params(TINY, seed=5))
    th = _dejavu(TINY, head_k=1)
    prompt = jnp.asarray([[3, 4, 5, 6, 9], [11, 12, 13, 14, 15]])
    t = prompt.shape[1]  # the decode step's slot
    _, _, want = _decode_step(TINY, params, kernels_for_method("dejavu", "xla"), th, prompt)
    before = len(head_calls())  # the XLA step's own calls on a GPU (decode_attention)
    _, stats, got = _decode_step(
        TINY, params, kernels_for_method("dejavu", "pallas", "gpu_interpret"), th, prompt
    )
    assert head_calls()[before:] == [((2, 4), "gpu_interpret")] * TINY.num_layers
    for i in range(TINY.num_layers):
        o_zero = np.asarray(stats[f"layers_{i}"]["self_attn"]["o_in"][0])
        np.testing.assert_allclose(o_zero, 0.75, atol=1e-6)  # 1 of 4 heads per row
        for name in ("k", "v"):
            new_BxKxD = np.asarray(got[f"layers_{i}"][name][:, :, t])
            assert np.all(np.abs(new_BxKxD).max(-1) > 0), (i, name)  # every kv head written
            np.testing.assert_allclose(
                new_BxKxD, np.asarray(want[f"layers_{i}"][name][:, :, t]), rtol=2e-4, atol=2e-4
            )


@pytest.mark.slow
def test_greedy_tokens_tiny(impl, head_calls):
    params = jax.tree.map(lambda x: x * 8, init_params(TINY, seed=6))
    th = _dejavu(TINY, head_k=1, ffn_k=64)
    prompts = [[5, 6, 7, 8], [9, 10]]
    ref = Generator(TINY, params, kernels=kernels_for_method("dejavu", "xla")).generate_ids(
        prompts, 6, thresholds=th, stop_at_eos=False
    )
    gen = Generator(TINY, params, kernels=kernels_for_method("dejavu", "pallas", impl))
    got = gen.generate_ids(prompts, 6, thresholds=th, stop_at_eos=False)
    assert head_calls(), "the decode step did not call head_sparse_attention"
    assert got.tokens == ref.tokens
    assert got.measured_sparsity["o_in"] == pytest.approx(0.75, abs=1e-6)


SMOLLM2_LAYERS = 8  # of 30: every layer has the same shapes; interpret mode costs per layer


@pytest.mark.slow
def test_greedy_tokens_smollm2(smollm2, head_calls):
    """SmolLM2-135M's real weights (9 query heads over 3 kv heads, Dh 64), its first
    SMOLLM2_LAYERS layers, 6 of 9 heads kept: the kernels' greedy tokens are masked dense's."""
    n = SMOLLM2_LAYERS
    config = smollm2.config.replace(num_layers=n, layer_types=smollm2.config.layer_types[:n])
    params = {
        k: v
        for k, v in smollm2.params.items()
        if not k.startswith("layers_") or int(k.split("_")[1]) < n
    }
    th = _dejavu(config, head_k=6, ffn_k=config.intermediate_size // 2)
    prompts = [[1, 504, 3458, 314, 4933, 282]]
    ref = Generator(config, params, kernels=kernels_for_method("dejavu", "xla")).generate_ids(
        prompts, 4, thresholds=th, stop_at_eos=False
    )
    gen = Generator(config, params, kernels=kernels_for_method("dejavu", "pallas", "gpu_interpret"))
    got = gen.generate_ids(prompts, 4, thresholds=th, stop_at_eos=False)
    assert head_calls()[:1] == [((1, 9), "gpu_interpret")]
    assert got.tokens == ref.tokens
    assert got.measured_sparsity["o_in"] == pytest.approx(1 - 6 / 9, abs=1e-6)
