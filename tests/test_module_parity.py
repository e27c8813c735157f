"""Module by module against HF PyTorch (float32, the same random weights): our attention
against `LlamaAttention` (RoPE at nonzero positions, GQA, a causal mask), our gated FFN
against `LlamaMLP`, and one decoder block against `LlamaDecoderLayer`; the same for Qwen2
(q/k/v biases), Mistral (a sliding window) and Gemma 3 (`Gemma3DecoderLayer`: q/k norms,
four norms, GeGLU, a sliding and a global layer with their own RoPE bases).

Each module of ours is run alone through Flax `Module.apply` with the params subtree of
its block, which the converter's key map (`convert.keymaps.hf_key_map`) fills from the HF
state dict; the HF module gets its RoPE tables from the model's own rotary embedding and
an additive mask built here from the positions (causal, and the layer's window).
The tiny random models are those of tests/conftest.py (`TINY_HF_CONFIGS`).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax.numpy as jnp

from convert.keymaps import hf_key_map
from jaxsparse.config import ModelConfig
from jaxsparse.models.attention import SelfAttention
from jaxsparse.models.llama import LlamaBlock, SwiGLU, rope_tables

B, T = 2, 9  # longer than the sliding windows of the tiny Mistral (5) and Gemma 3 (4)
TOL = 1e-5
# (tiny model, layer): Gemma 3's layer 0 is sliding, layer 1 global
CASES = [
    ("llama", 0),
    ("llama", 1),
    ("llama3_rope", 0),
    ("qwen2", 0),
    ("mistral", 0),
    ("gemma3", 0),
    ("gemma3", 1),
]


@pytest.fixture(scope="module")
def models(tiny_hf_tools):
    """name -> (HF model, our config, our params tree from the converter's key map)."""
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            hf = tiny_hf_tools.make_tiny_hf_model(name, seed=3)
            config = ModelConfig.from_hf(hf.config.to_dict())
            cache[name] = (hf, config, params_from_torch(hf, config))
        return cache[name]

    return get


def params_from_torch(hf, config: ModelConfig) -> dict:
    """Our params tree from the HF state dict, through the converter's key map."""
    rules = hf_key_map(config)
    tree: dict = {}
    for name, tensor in hf.state_dict().items():
        if name not in rules:
            continue
        rule = rules[name]
        node = tree
        for key in rule.path[:-1]:
            node = node.setdefault(key, {})
        node[rule.path[-1]] = jnp.asarray(rule.apply(tensor.detach().numpy()))
    return tree


def hf_window(hf_config, layer: int) -> int | None:
    """The attention window HF gives layer `layer` (None: global)."""
    types = getattr(hf_config, "layer_types", None)
    if types:
        return hf_config.sliding_window if types[layer] == "sliding_attention" else None
    return hf_config.sliding_window if hf_config.model_type == "mistral" else None


def inputs(c: ModelConfig, seed: int = 0):
    """Hidden states [B, T, d] and positions: row 0 starts at 3, row 1 at 0."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, c.hidden_size)).astype(np.float32)
    pos = np.stack([np.arange(T) + 3, np.arange(T)]).astype(np.int32)
    return x, pos


def hf_mask(pos: np.ndarray, window: int | None) -> torch.Tensor:
    """HF's additive eager mask [B, 1, T, T]: 0 where a query sees a key, else min."""
    q, k = pos[:, :, None], pos[:, None, :]
    see = k <= q
    if window is not None:
        see &= (q - k) < window
    mask = np.where(see, 0.0, np.finfo(np.float32).min).astype(np.float32)
    return torch.from_numpy(mask[:, None])


def hf_rope(hf, x: torch.Tensor, pos: np.ndarray, layer: int):
    rotary = hf.model.rotary_emb
    ids = torch.from_numpy(pos.astype(np.int64))
    types = getattr(hf.config, "layer_types", None)
    if hf.config.model_type == "gemma3_text":
        return rotary(x, ids, types[layer])
    return rotary(x, ids)


def assert_close(ours, want, what: str):
    ours, want = np.asarray(ours), want.detach().numpy()
    assert ours.shape == want.shape, (what, ours.shape, want.shape)
    err = np.max(np.abs(ours - want)) / np.max(np.abs(want))
    print(f"{what}: max abs error / max abs {err:.2e}")
    assert err < TOL, f"{what}: max abs error / max abs {err:.2e} >= {TOL}"


def _ours_rope(c: ModelConfig, pos: np.ndarray):
    return rope_tables(c, jnp.asarray(pos))


@pytest.mark.parametrize("name,layer", CASES)
def test_attention_matches_hf(models, name, layer):
    hf, c, params = models(name)
    block = hf.model.layers[layer]
    if name == "llama":
        assert type(block.self_attn).__name__ == "LlamaAttention"
    x, pos = inputs(c, layer)
    xt = torch.from_numpy(x)
    with torch.no_grad():
        want, _ = block.self_attn(
            hidden_states=xt,
            position_embeddings=hf_rope(hf, xt, pos, layer),
            attention_mask=hf_mask(pos, hf_window(hf.config, layer)),
        )
    attn = SelfAttention(c, layer_type=c.layer_type(layer))
    p = jnp.asarray(pos)
    ours, _ = attn.apply(
        {"params": params[f"layers_{layer}"]["self_attn"]},
        jnp.asarray(x),
        p,
        p,
        _ours_rope(c, pos),
        None,
        0,
        None,
    )
    assert_close(ours, want, f"{name} layer {layer} attention")


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma3"])
def test_mlp_matches_hf(models, name):
    hf, c, params = models(name)
    mlp = hf.model.layers[0].mlp
    if name == "llama":
        assert type(mlp).__name__ == "LlamaMLP"
    x, _ = inputs(c)
    with torch.no_grad():
        want = mlp(torch.from_numpy(x))
    ours = SwiGLU(c).apply({"params": params["layers_0"]["mlp"]}, jnp.asarray(x), None)
    assert_close(ours, want, f"{name} mlp")


@pytest.mark.parametrize("name,layer", CASES)
def test_decoder_block_matches_hf(models, name, layer):
    hf, c, params = models(name)
    block = hf.model.layers[layer]
    if name == "llama":
        assert type(block).__name__ == "LlamaDecoderLayer"
    if name == "gemma3":
        assert type(block).__name__ == "Gemma3DecoderLayer"
    x, pos = inputs(c, 10 + layer)
    xt = torch.from_numpy(x)
    with torch.no_grad():
        out = block(
            xt,
            attention_mask=hf_mask(pos, hf_window(hf.config, layer)),
            position_ids=torch.from_numpy(pos.astype(np.int64)),
            position_embeddings=hf_rope(hf, xt, pos, layer),
        )
    want = out[0] if isinstance(out, tuple) else out
    p = jnp.asarray(pos)
    ours, _ = LlamaBlock(c, layer_type=c.layer_type(layer)).apply(
        {"params": params[f"layers_{layer}"]},
        jnp.asarray(x),
        p,
        p,
        _ours_rope(c, pos),
        None,
        0,
        None,
    )
    assert_close(ours, want, f"{name} layer {layer} block")


def test_the_windows_and_bases_differ_where_the_cases_need_them(models):
    """The cases exercise what they claim: the Mistral and Gemma 3 windows are shorter
    than T, and Gemma 3's layers 0 and 1 have different windows and RoPE bases."""
    hf, c, _ = models("gemma3")
    assert hf_window(hf.config, 0) < T and hf_window(hf.config, 1) is None
    assert c.layer_type(0) != c.layer_type(1) and c.rope_local_theta != c.rope_theta
    hf, c, _ = models("mistral")
    assert hf_window(hf.config, 0) < T and c.num_kv_heads < c.num_heads
    hf, c, _ = models("llama")
    assert 1 < c.num_kv_heads < c.num_heads  # GQA
