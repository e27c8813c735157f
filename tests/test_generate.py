"""Generation: the cached, batched, compiled decode against a plain full-forward greedy loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsparse.config import ModelConfig
from jaxsparse.generate import Generator, SamplingParams, bucket_length, sample_logits
from jaxsparse.models import build_model, init_params

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
            head_dim=8)


def tiny(model_type="llama", **kw):
    kw = {**TINY, **kw}
    if model_type == "opt":
        base = dict(num_kv_heads=4, position_offset=2, qkv_bias=True, o_bias=True,
                    mlp_bias=True, tie_word_embeddings=True, max_position_embeddings=128)
    else:
        base = dict(num_kv_heads=2, tie_word_embeddings=True)
    return ModelConfig(model_type=model_type, **{**base, **kw})


def greedy_reference(config, params, prompt, n):
    """Greedy decoding by recomputing the full forward pass for every token, no cache."""
    model = build_model(config)
    ids = list(prompt)
    width = len(prompt) + n  # one shape for every step: right-padded, read at the last real token
    fwd = jax.jit(lambda p, t: model.apply({"params": p}, t, jnp.arange(width)[None])[0])
    for _ in range(n):
        logits = fwd(params, jnp.asarray([ids + [0] * (width - len(ids))]))
        ids.append(int(jnp.argmax(logits[0, len(ids) - 1])))
    return ids[len(prompt):]


@pytest.mark.parametrize("model_type", ["llama", "opt"])
def test_batched_cached_greedy_matches_full_forward(model_type):
    config = tiny(model_type)
    params = init_params(config, seed=1)
    params = jax.tree.map(lambda x: x * 10, params)  # sharper logits: fewer near-ties
    gen = Generator(config, params)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 97, size=n).tolist() for n in (5, 17, 1)]
    result = gen.generate_ids(prompts, max_new_tokens=8, stop_at_eos=False)
    for prompt, got in zip(prompts, result.tokens):
        assert got == greedy_reference(config, params, prompt, 8)
    assert result.decode_steps == 7
    assert result.prefill_tokens_per_s > 0 and result.decode_tokens_per_s > 0


def test_compiled_once_per_shape_and_reused():
    config = tiny()
    gen = Generator(config, init_params(config))
    gen.generate_ids([[5, 6, 7]], max_new_tokens=4, stop_at_eos=False)
    n = len(gen._compiled)
    r = gen.generate_ids([[8, 9]], max_new_tokens=4, stop_at_eos=False,
                         sampling=SamplingParams(temperature=0.7, top_k=5, top_p=0.9, seed=3))
    assert len(gen._compiled) == n  # same bucket, batch and length; sampling is data
    assert r.compile_s == 0.0
    gen.generate_ids([[8, 9], [1]], max_new_tokens=4, stop_at_eos=False)
    assert len(gen._compiled) == n + 2  # a new batch size compiles prefill and decode once


def test_stops_at_eos():
    config = tiny(eos_token_ids=(7,))
    params = init_params(config)
    gen = Generator(config, params)
    first = gen.generate_ids([[3, 4, 5]], max_new_tokens=6, stop_at_eos=False).tokens[0]
    eos = first[2]
    gen = Generator(tiny(eos_token_ids=(eos,)), params)
    got = gen.generate_ids([[3, 4, 5]], max_new_tokens=6).tokens[0]
    assert got == first[: first.index(eos)]


def test_sampling_seeded_and_filtered():
    logits = jax.random.normal(jax.random.key(0), (4, 50)) * 3
    key = jax.random.key(1)
    greedy = sample_logits(logits, key, 0.0, 0, 1.0)
    np.testing.assert_array_equal(greedy, jnp.argmax(logits, -1))
    a = sample_logits(logits, key, 1.0, 0, 1.0)
    b = sample_logits(logits, key, 1.0, 0, 1.0)
    np.testing.assert_array_equal(a, b)
    top2 = jnp.argsort(-logits, axis=-1)[:, :2]
    for seed in range(20):
        s = sample_logits(logits, jax.random.key(seed), 5.0, 2, 1.0)
        assert all(int(s[i]) in top2[i].tolist() for i in range(4))
    # A tiny top_p keeps only the most likely token, whatever the temperature.
    for seed in range(5):
        s = sample_logits(logits, jax.random.key(seed), 5.0, 0, 1e-4)
        np.testing.assert_array_equal(s, greedy)


def test_bad_arguments():
    config = tiny()
    gen = Generator(config, init_params(config))
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen.generate_ids([[1]], max_new_tokens=0)
    with pytest.raises(ValueError, match="at least one token"):
        gen.generate_ids([[]])
    assert bucket_length(1) == 16 and bucket_length(17) == 32 and bucket_length(32) == 32


def _random_thresholds(config, key, scale=0.02):
    from jaxsparse.rules import TENSORS, tensor_width

    out = {}
    for i in range(config.num_layers):
        key, *ks = jax.random.split(key, len(TENSORS) + 1)
        out[f"layers_{i}"] = {
            n: scale * jax.random.uniform(k, (tensor_width(
                n, config.hidden_size, config.q_dim, config.intermediate_size),))
            for n, k in zip(TENSORS, ks)
        }
    return out


@pytest.mark.parametrize("method,impl", [("chess", "gpu_interpret"), ("chess+", "tpu_interpret"),
                                         ("teal", "gpu_interpret"), ("teal", "tpu_interpret")])
def test_kernel_decoding_gives_masked_dense_tokens(method, impl):
    """Sparse decoding through the Pallas kernels (interpret mode on the CPU) gives the same
    tokens as the masked dense XLA path, for a batch of prompts of different lengths."""
    from jaxsparse.models import kernels_for_method

    config = tiny(intermediate_size=96)
    params = jax.tree.map(lambda x: x * 10, init_params(config, seed=2))
    thresholds = _random_thresholds(config, jax.random.key(4), scale=0.3)
    prompts = [[5, 6, 7, 8], [9, 10]]
    dense = Generator(config, params).generate_ids(
        prompts, max_new_tokens=6, thresholds=thresholds, stop_at_eos=False)
    kern = Generator(config, params, kernels=kernels_for_method(method, "pallas", impl))
    got = kern.generate_ids(prompts, max_new_tokens=6, thresholds=thresholds, stop_at_eos=False)
    assert got.tokens == dense.tokens
    assert got.measured_sparsity["gate"] == pytest.approx(dense.measured_sparsity["gate"])
    assert 0.1 < dense.measured_sparsity["down_in"] < 0.95  # the thresholds did zero things


@pytest.mark.parametrize("model_type,extra", [("llama", {}), ("qwen2", {"qkv_bias": True}),
                                              ("opt", {})])
def test_fused_qkv_layout_gives_the_same_logits(model_type, extra):
    """`prepare_params` with fuse_qkv (one q/k/v matmul) computes the same function."""
    from jaxsparse.models import Kernels, prepare_params

    config = tiny(model_type, **extra)
    params = init_params(config, seed=3)
    if extra.get("qkv_bias"):  # non-zero biases, so that their concatenation is checked
        params = jax.tree_util.tree_map_with_path(
            lambda p, x: x + 0.1 if "bias" in jax.tree_util.keystr(p) else x, params)
    tokens = jnp.asarray([[5, 6, 7, 8, 9]])
    pos = jnp.arange(5)[None]
    ref, _ = build_model(config).apply({"params": params}, tokens, pos)
    for kernels, name in [(Kernels("xla", fuse_qkv=True), "qkv_proj"),
                          (Kernels("xla", fuse_kv=True), "kv_proj")]:
        fused = prepare_params(params, config, kernels)
        assert name in fused["layers_0"]["self_attn"]
        assert "k_proj" not in fused["layers_0"]["self_attn"]
        got, _ = build_model(config, kernels).apply({"params": fused}, tokens, pos)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
