"""Per-family tensor-name maps: source tensor name -> our param path and layout change.

One table per source naming scheme (HF Llama family and Gemma 3, HF OPT, GGUF llama/qwen2/
gemma3), built
from the `ModelConfig`, in the spirit of levanter's `hf_checkpoints.py`. A map covers
every param of the model; the converter checks the source against it (missing,
unexpected, misshaped tensors). It reads no files.

Layout changes: HF `nn.Linear` weights are `[out, in]` and ours `[in, out]` (transpose).
llama.cpp's converter permutes the rows of the Q and K weights of `llama` GGUFs for its
RoPE layout; `unpermute_heads` undoes it, as transformers' `LlamaTensorProcessor` does.
llama.cpp stores Gemma's `(1 + w)` norm weights as `1 + w`; `add=-1` undoes it, as
transformers' `Gemma2TensorProcessor` does.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from jaxsparse.config import ModelConfig

ParamPath = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class TensorRule:
    path: ParamPath  # where the tensor goes in our params tree
    transpose: bool = False  # [out, in] -> [in, out]
    unpermute_heads: int | None = None  # GGUF llama Q/K: number of heads to un-permute over
    add: float = 0.0  # GGUF gemma3 norms: -1

    def apply(self, x: np.ndarray) -> np.ndarray:
        if self.unpermute_heads is not None:
            x = reverse_permute_rows(x, self.unpermute_heads)
        if self.add:
            x = x + np.asarray(self.add, x.dtype)
        return x.T if self.transpose else x


def reverse_permute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K row permutation (interleaved -> rotate-half RoPE layout).

    Same as transformers' `LlamaTensorProcessor._reverse_permute_weights`: each head's
    rows are `[half, 2]` (interleaved pairs) in the GGUF and `[2, half]` in HF.
    """
    dim = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


# Source tensors that carry no parameters of ours and are skipped.
HF_IGNORED = (re.compile(r".*\.rotary_emb\.inv_freq$"), re.compile(r".*\.attn\.masked_bias$"))


def hf_key_map(config: ModelConfig) -> dict[str, TensorRule]:
    """HF `*ForCausalLM` state-dict names -> rules, for the config's family."""
    if config.family == "opt":
        return _hf_opt_map(config)
    c = config
    m: dict[str, TensorRule] = {
        "model.embed_tokens.weight": TensorRule(("embed_tokens", "embedding")),
        "model.norm.weight": TensorRule(("norm", "scale")),
    }
    if not c.tie_word_embeddings:
        m["lm_head.weight"] = TensorRule(("lm_head", "kernel"), transpose=True)
    for i in range(c.num_layers):
        hf, ours = f"model.layers.{i}", f"layers_{i}"
        norms = ["input_layernorm", "post_attention_layernorm"]
        if c.is_gemma3:
            norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
            for p in ("q", "k"):
                m[f"{hf}.self_attn.{p}_norm.weight"] = TensorRule(
                    (ours, "self_attn", f"{p}_norm", "scale")
                )
        for norm in norms:
            m[f"{hf}.{norm}.weight"] = TensorRule((ours, norm, "scale"))
        for p in ("q", "k", "v", "o"):
            m[f"{hf}.self_attn.{p}_proj.weight"] = TensorRule(
                (ours, "self_attn", f"{p}_proj", "kernel"), transpose=True
            )
            if (c.qkv_bias and p != "o") or (c.o_bias and p == "o"):
                m[f"{hf}.self_attn.{p}_proj.bias"] = TensorRule(
                    (ours, "self_attn", f"{p}_proj", "bias")
                )
        for p in ("gate", "up", "down"):
            m[f"{hf}.mlp.{p}_proj.weight"] = TensorRule(
                (ours, "mlp", f"{p}_proj", "kernel"), transpose=True
            )
            if c.mlp_bias:
                m[f"{hf}.mlp.{p}_proj.bias"] = TensorRule((ours, "mlp", f"{p}_proj", "bias"))
    return m


def _hf_opt_map(c: ModelConfig) -> dict[str, TensorRule]:
    d = "model.decoder"
    m: dict[str, TensorRule] = {
        f"{d}.embed_tokens.weight": TensorRule(("embed_tokens", "embedding")),
        f"{d}.embed_positions.weight": TensorRule(("embed_positions", "embedding")),
    }
    if c.word_embed_proj_dim:
        m[f"{d}.project_in.weight"] = TensorRule(("project_in", "kernel"), transpose=True)
        m[f"{d}.project_out.weight"] = TensorRule(("project_out", "kernel"), transpose=True)
    if c.final_layer_norm and c.layer_norm_elementwise_affine:
        m[f"{d}.final_layer_norm.weight"] = TensorRule(("final_layer_norm", "scale"))
        m[f"{d}.final_layer_norm.bias"] = TensorRule(("final_layer_norm", "bias"))
    for i in range(c.num_layers):
        hf, ours = f"{d}.layers.{i}", f"layers_{i}"
        for p, q in (("q", "q"), ("k", "k"), ("v", "v"), ("out", "o")):
            m[f"{hf}.self_attn.{p}_proj.weight"] = TensorRule(
                (ours, "self_attn", f"{q}_proj", "kernel"), transpose=True
            )
            if (c.qkv_bias and q != "o") or (c.o_bias and q == "o"):
                m[f"{hf}.self_attn.{p}_proj.bias"] = TensorRule(
                    (ours, "self_attn", f"{q}_proj", "bias")
                )
        if c.layer_norm_elementwise_affine:
            for norm in ("self_attn_layer_norm", "final_layer_norm"):
                m[f"{hf}.{norm}.weight"] = TensorRule((ours, norm, "scale"))
                m[f"{hf}.{norm}.bias"] = TensorRule((ours, norm, "bias"))
        for fc in ("fc1", "fc2"):
            m[f"{hf}.{fc}.weight"] = TensorRule((ours, "mlp", fc, "kernel"), transpose=True)
            if c.mlp_bias:
                m[f"{hf}.{fc}.bias"] = TensorRule((ours, "mlp", fc, "bias"))
    return m


def hf_optional(config: ModelConfig) -> set[str]:
    """HF names that may be present but are not read: the tied output projection."""
    if config.tie_word_embeddings:
        return {"lm_head.weight"}
    return set()


def hf_canonical_name(name: str, key_map: dict[str, TensorRule]) -> str:
    """Maps a base-model name (`layers.0...`, `decoder.layers.0...`) to the map's `model.` form."""
    if name in key_map or name.startswith(("model.", "lm_head.")):
        return name
    return f"model.{name}"


# GGUF gemma3 norm names -> ours (llama's `ffn_norm` is our `post_attention_layernorm`).
_GGUF_GEMMA3_NORMS = {
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


def gguf_key_map(config: ModelConfig, arch: str) -> dict[str, TensorRule]:
    """GGUF tensor names (llama, qwen2, gemma3) -> rules. Shapes are compared in HF row-major
    order."""
    c = config
    permute = arch == "llama"  # llama.cpp permutes Q/K for llama only (qwen2 uses NEOX RoPE)
    norm_add = -1.0 if arch == "gemma3" else 0.0  # llama.cpp stored 1 + w
    m: dict[str, TensorRule] = {
        "token_embd.weight": TensorRule(("embed_tokens", "embedding")),
        "output_norm.weight": TensorRule(("norm", "scale"), add=norm_add),
    }
    if not c.tie_word_embeddings:
        m["output.weight"] = TensorRule(("lm_head", "kernel"), transpose=True)
    for i in range(c.num_layers):
        b, ours = f"blk.{i}", f"layers_{i}"
        if arch == "gemma3":
            for g, n in _GGUF_GEMMA3_NORMS.items():
                m[f"{b}.{g}.weight"] = TensorRule((ours, n, "scale"), add=norm_add)
            for p in ("q", "k"):
                m[f"{b}.attn_{p}_norm.weight"] = TensorRule(
                    (ours, "self_attn", f"{p}_norm", "scale"), add=norm_add
                )
        else:
            m[f"{b}.attn_norm.weight"] = TensorRule((ours, "input_layernorm", "scale"))
            m[f"{b}.ffn_norm.weight"] = TensorRule((ours, "post_attention_layernorm", "scale"))
        heads = {"q": c.num_heads, "k": c.num_kv_heads, "v": None}
        for g, p in (("attn_q", "q"), ("attn_k", "k"), ("attn_v", "v"), ("attn_output", "o")):
            n = heads.get(p) if permute else None
            m[f"{b}.{g}.weight"] = TensorRule(
                (ours, "self_attn", f"{p}_proj", "kernel"), transpose=True, unpermute_heads=n
            )
            if (c.qkv_bias and p != "o") or (c.o_bias and p == "o"):
                m[f"{b}.{g}.bias"] = TensorRule(
                    (ours, "self_attn", f"{p}_proj", "bias"), unpermute_heads=n
                )
        for g in ("gate", "up", "down"):
            m[f"{b}.ffn_{g}.weight"] = TensorRule(
                (ours, "mlp", f"{g}_proj", "kernel"), transpose=True
            )
    return m


def expected_source_shape(rule: TensorRule, our_shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(reversed(our_shape)) if rule.transpose else tuple(our_shape)
