"""Converted HF checkpoints against HF PyTorch: every architecture, safetensors and .bin,
sharded or not; full forward, prefill + cached decode, and left padding. fp32, rel err 1e-4.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from parity import rel_err

from convert import read_model
from jaxsparse.loading import load_model
from jaxsparse.models import build_model, init_cache, positions_from_mask

torch = pytest.importorskip("torch")
jax.config.update("jax_default_matmul_precision", "highest")

ARCHS = [
    "llama",
    "llama3_rope",
    "llama_tied",
    "mistral",
    "qwen2",
    "gemma3",
    "opt",
    "opt_post_ln",
    "opt_proj",
]
B, T, PREFILL = 2, 12, 5
TOL = 1e-4


def tokens_for(vocab: int, seed: int = 0, shape=(B, T)) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab, shape).astype(np.int32)


def hf_logits(model, tokens, mask=None) -> np.ndarray:
    ids = torch.from_numpy(tokens.astype(np.int64))
    kw = {}
    if mask is not None:
        m = torch.from_numpy(mask.astype(np.int64))
        kw["attention_mask"] = m
        if model.config.model_type != "opt":  # OPT derives positions from the mask itself
            kw["position_ids"] = (m.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits.float().numpy()


@functools.cache
def _apply(config):
    """One jitted apply per config: a whole-model compile is cheaper than eager op dispatch."""
    return jax.jit(build_model(config).apply)


def our_logits(config, params, tokens, positions=None) -> np.ndarray:
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    logits, _ = _apply(config)({"params": params}, jnp.asarray(tokens), positions)
    return np.asarray(logits)


def our_prefill_decode(config, params, tokens, valid, prefill: int) -> np.ndarray:
    """Logits of every token: a prefill of `prefill` tokens, then one token at a time."""
    apply = _apply(config)
    b, t = tokens.shape
    positions = positions_from_mask(valid)
    cache = init_cache(config, b, t)
    out, cache = apply(
        {"params": params},
        jnp.asarray(tokens[:, :prefill]),
        positions[:, :prefill],
        cache=cache,
        cache_index=0,
    )
    outs = [np.asarray(out)]
    for i in range(prefill, t):
        out, cache = apply(
            {"params": params},
            jnp.asarray(tokens[:, i : i + 1]),
            positions[:, i : i + 1],
            cache=cache,
            cache_index=i,
        )
        outs.append(np.asarray(out))
    return np.concatenate(outs, axis=1)


@pytest.fixture(scope="module")
def converted(tiny_hf_models):
    """(arch, format) -> ConvertedModel with jax params, converted once per module."""
    cache = {}

    def get(arch, fmt):
        if (arch, fmt) not in cache:
            m = tiny_hf_models[arch]
            src = m.safetensors_dir if fmt == "safetensors" else m.bin_dir
            c = read_model(src, "float32")
            c.params = jax.tree.map(jnp.asarray, c.params)
            cache[arch, fmt] = c
        return cache[arch, fmt]

    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_full_forward_matches_hf(arch, tiny_hf_models, converted):
    m = tiny_hf_models[arch]
    c = converted(arch, "safetensors")
    tokens = tokens_for(c.config.vocab_size)
    want = hf_logits(m.torch_model, tokens)
    got = our_logits(c.config, c.params, tokens)
    assert got.shape == want.shape
    err = rel_err(got, want)
    print(f"{arch}: full forward rel err {err:.2e}")
    assert err < TOL


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_batch_and_cached_decode_match_hf(arch, tiny_hf_models, converted):
    """Row 0 is left-padded by 4 tokens (positions -1 in ours, attention_mask in HF), row 1
    is not. Our full forward, and our prefill followed by token-by-token decoding with the
    KV cache, both match HF's full-sequence logits on every real token."""
    m = tiny_hf_models[arch]
    c = converted(arch, "safetensors")
    tokens = tokens_for(c.config.vocab_size, seed=2)
    valid = np.ones_like(tokens)
    valid[0, :4] = 0
    tokens[0, :4] = 1  # a pad id; its value must not matter
    want = hf_logits(m.torch_model, tokens, mask=valid)
    got_full = our_logits(c.config, c.params, tokens, positions_from_mask(valid))
    got_decode = our_prefill_decode(c.config, c.params, tokens, valid, PREFILL)
    keep = valid.astype(bool)
    err_full = rel_err(got_full[keep], want[keep])
    err_decode = rel_err(got_decode[keep], want[keep])
    err_decode_unpadded = rel_err(got_decode[1], want[1])
    print(
        f"{arch}: left padding rel err {err_full:.2e} (full), {err_decode:.2e} (prefill + "
        f"decode), unpadded row {err_decode_unpadded:.2e}"
    )
    assert err_full < TOL and err_decode < TOL and err_decode_unpadded < TOL


@pytest.mark.parametrize("arch", ARCHS)
def test_bin_and_safetensors_give_identical_params(arch, converted):
    """The .bin checkpoints convert to bit-identical params, so they match HF as well."""
    a, b = converted(arch, "safetensors").params, converted(arch, "bin").params
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("arch", ["qwen2", "llama_tied"])
def test_sharded_checkpoints(arch, tmp_path, tiny_hf_models, tiny_hf_tools, converted):
    """Sharded safetensors (save_pretrained max_shard_size) and sharded .bin (with index)."""
    m = tiny_hf_models[arch]
    st = tmp_path / "st"
    m.torch_model.save_pretrained(st, max_shard_size="20KB")
    assert (st / "model.safetensors.index.json").is_file()
    assert len(list(st.glob("model-*.safetensors"))) > 2
    bins = tmp_path / "bin"
    tiny_hf_tools.save_torch_bin(m.torch_model, bins, shards=3)
    ref = converted(arch, "safetensors").params
    tokens = tokens_for(ref["embed_tokens"]["embedding"].shape[0], seed=3)
    want = hf_logits(m.torch_model, tokens)
    for src in (st, bins):
        c = read_model(src, "float32")
        for x, y in zip(jax.tree.leaves(c.params), jax.tree.leaves(ref), strict=True):
            assert np.array_equal(x, np.asarray(y))
        assert rel_err(our_logits(c.config, c.params, tokens), want) < TOL


def test_cli_converts_to_a_checkpoint_that_loads(tmp_path, tiny_hf_models, converted):
    from jaxsparse.cli import main

    m = tiny_hf_models["llama3_rope"]
    out = tmp_path / "ckpt"
    assert main(["convert", str(m.safetensors_dir), str(out)]) == 0
    loaded = load_model(out)
    ref = converted("llama3_rope", "safetensors")
    assert loaded.config == ref.config
    for x, y in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(ref.params), strict=True):
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
    tokens = tokens_for(ref.config.vocab_size, seed=4)
    assert (
        rel_err(our_logits(loaded.config, loaded.params, tokens), hf_logits(m.torch_model, tokens))
        < TOL
    )


def test_bfloat16_conversion_rounds_like_torch(tiny_hf_models):
    m = tiny_hf_models["qwen2"]
    c = read_model(m.safetensors_dir, "bfloat16")
    assert {str(x.dtype) for x in jax.tree.leaves(c.params)} == {"bfloat16"}
    assert c.config.dtype == "bfloat16"
    w = m.torch_model.model.layers[1].self_attn.q_proj.weight.detach()
    want = w.to(torch.bfloat16).float().numpy().T
    got = np.asarray(c.params["layers_1"]["self_attn"]["q_proj"]["kernel"], np.float32)
    assert np.array_equal(got, want)


def test_every_tiny_model_is_tested(tiny_hf_models):
    assert sorted(ARCHS) == sorted(tiny_hf_models)


def test_random_init_is_not_what_we_compare(tiny_hf_models, tiny_hf_tools):
    """Guards the fixture: weights are large enough that a wrong mapping shows in the logits."""
    m = tiny_hf_models["llama"]
    other = tiny_hf_tools.make_tiny_hf_model("llama", seed=123)
    tokens = tokens_for(m.torch_model.config.vocab_size)
    assert rel_err(hf_logits(other, tokens), hf_logits(m.torch_model, tokens)) > 0.3
