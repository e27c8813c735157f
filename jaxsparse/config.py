"""Model configuration: one frozen dataclass for every supported decoder-only family.

Holds `ModelConfig`, built from a Hugging Face `config.json` (`ModelConfig.from_hf`) or
from GGUF metadata (`ModelConfig.from_gguf_metadata`), and the RoPE frequency table
derived from it. It holds no model code and no weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

# HF `model_type` -> our family. Llama-like families share one module (gated FFN, RMSNorm,
# RoPE); Gemma 3 text models are Llama-like with the switches listed at `ModelConfig.is_gemma3`.
GEMMA3 = "gemma3_text"
LLAMA_LIKE = ("llama", "mistral", "qwen2", "smollm2", GEMMA3)
SUPPORTED_MODEL_TYPES = (*LLAMA_LIKE, "opt")
# "frequency_factors": each inverse frequency divided by its own factor (`factors`, one per
# frequency: llama.cpp's `rope_freqs.weight` in a GGUF file, which holds Llama 3.1/3.2's
# "llama3" scaling as numbers).
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "frequency_factors")
# Gemma 3's per-layer attention kinds (HF `layer_types`).
SLIDING, FULL = "sliding_attention", "full_attention"


class ConfigError(ValueError):
    """A config (config.json or GGUF metadata) that this library cannot build a model from."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str  # HF model_type: llama, mistral, qwen2, opt
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # ((key, value), ...) so that the config stays hashable; see `rope_scaling_dict`.
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    # Gemma 3: the kind of each layer (SLIDING or FULL). Empty: every layer alike, with
    # `sliding_window` (if any) on all of them (Mistral).
    layer_types: tuple[str, ...] = ()
    rope_local_theta: float | None = None  # RoPE base of the SLIDING layers (Gemma 3)
    query_pre_attn_scalar: float | None = None  # attention scale**-2 (default: head_dim)
    # OPT only.
    do_layer_norm_before: bool = True
    word_embed_proj_dim: int | None = None
    final_layer_norm: bool = True
    layer_norm_elementwise_affine: bool = True
    position_offset: int = 0
    # Tokens.
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    dtype: str = "float32"  # dtype of the params

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unknown architecture model_type={self.model_type!r}; supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if self.layer_types and (
            len(self.layer_types) != self.num_layers or set(self.layer_types) - {SLIDING, FULL}
        ):
            raise ConfigError(
                f"layer_types={list(self.layer_types)}: expected {self.num_layers} entries, "
                f"each {SLIDING!r} or {FULL!r}"
            )
        rope_type = self.rope_scaling_dict.get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"rope_scaling type {rope_type!r} is not supported; supported: "
                f"{', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if rope_type == "frequency_factors":
            factors = self.rope_scaling_dict.get("factors") or ()
            positive = all(f > 0 for f in factors)
            if len(factors) != self.head_dim // 2 or not positive:
                raise ConfigError(
                    f"rope_scaling 'frequency_factors' needs {self.head_dim // 2} positive "
                    f"factors (head_dim // 2), got {len(factors)}"
                    + ("" if positive else ", some not positive")
                )

    # ---------------------------------------------------------------- derived

    @property
    def family(self) -> str:
        return "opt" if self.model_type == "opt" else "llama"

    @property
    def is_gemma3(self) -> bool:
        """Gemma 3 switches on the Llama blocks: GeGLU (gelu tanh) gate, RMSNorm scaled by
        `(1 + w)`, q/k RMSNorm, embeddings scaled by sqrt(hidden), norms after attention and
        around the FFN, per-layer sliding-window or global attention (two RoPE bases)."""
        return self.model_type == GEMMA3

    @property
    def activation(self) -> str:
        """The FFN activation: relu (OPT), gelu_tanh (Gemma 3's GeGLU gate) or silu."""
        if self.family == "opt":
            return "relu"
        return "gelu_tanh" if self.is_gemma3 else "silu"

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def layer_type(self, i: int) -> str:
        """The attention kind of layer `i` (FULL where the config does not say)."""
        return self.layer_types[i] if self.layer_types else FULL

    def attention_window(self, layer_type: str = FULL) -> int | None:
        """The sliding window of a layer of `layer_type` (None: attends to everything)."""
        if not self.layer_types:
            return self.sliding_window  # every layer alike (Mistral, Qwen2)
        return self.sliding_window if layer_type == SLIDING else None

    @property
    def rope_scaling_dict(self) -> dict[str, Any]:
        return dict(self.rope_scaling)

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def embed_dim(self) -> int:
        """Width of the token embeddings (OPT's `word_embed_proj_dim` where it differs)."""
        return self.word_embed_proj_dim or self.hidden_size

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rope_scaling"] = dict(self.rope_scaling)
        d["eos_token_ids"] = list(self.eos_token_ids)
        d["layer_types"] = list(self.layer_types)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        d["rope_scaling"] = _freeze(d.get("rope_scaling") or {})
        d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
        d["layer_types"] = tuple(d.get("layer_types") or ())
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown ModelConfig fields {sorted(unknown)}")
        return cls(**d)

    # ---------------------------------------------------------------- HF

    @classmethod
    def from_hf(cls, config: dict[str, Any] | str | Path, dtype: str = "float32") -> ModelConfig:
        """Builds the config from an HF `config.json` (a path, a directory or a dict)."""
        source = "config dict"
        if not isinstance(config, dict):
            path = Path(config)
            if path.is_dir():
                path = path / "config.json"
            source = str(path)
            try:
                config = json.loads(path.read_text())
            except FileNotFoundError:
                raise ConfigError(
                    f"{path}: no config.json; is this an HF model directory?"
                ) from None
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from None
        c = config
        model_type = c.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = c.get("architectures")
            raise ConfigError(
                f"{source}: unknown architecture model_type={model_type!r} (architectures="
                f"{archs}); supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        try:
            eos = c.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
            common = {
                "model_type": model_type,
                "vocab_size": c["vocab_size"],
                "hidden_size": c["hidden_size"],
                "num_layers": c["num_hidden_layers"],
                "num_heads": c["num_attention_heads"],
                "max_position_embeddings": c.get("max_position_embeddings", 2048),
                "bos_token_id": c.get("bos_token_id"),
                "eos_token_ids": eos_ids,
                "pad_token_id": c.get("pad_token_id"),
                "dtype": dtype,
            }
            if model_type == "opt":
                return cls(
                    **common,
                    intermediate_size=c["ffn_dim"],
                    num_kv_heads=c["num_attention_heads"],
                    head_dim=c["hidden_size"] // c["num_attention_heads"],
                    norm_eps=1e-5,
                    qkv_bias=c.get("enable_bias", True),
                    o_bias=c.get("enable_bias", True),
                    mlp_bias=c.get("enable_bias", True),
                    tie_word_embeddings=c.get("tie_word_embeddings", True),
                    do_layer_norm_before=c.get("do_layer_norm_before", True),
                    word_embed_proj_dim=(
                        c.get("word_embed_proj_dim")
                        if c.get("word_embed_proj_dim", c["hidden_size"]) != c["hidden_size"]
                        else None
                    ),
                    final_layer_norm=c.get("do_layer_norm_before", True)
                    and not c.get("_remove_final_layer_norm", False),
                    layer_norm_elementwise_affine=c.get("layer_norm_elementwise_affine", True),
                    position_offset=2,
                )
            if model_type == GEMMA3:
                return cls(**common, **_gemma3_fields(c, source))
            if c.get("hidden_act", "silu") != "silu":
                raise ConfigError(f"{source}: hidden_act={c.get('hidden_act')!r}; only silu")
            rope = dict(c.get("rope_parameters") or {})
            rope.update(c.get("rope_scaling") or {})
            theta = rope.pop("rope_theta", c.get("rope_theta", 10000.0))
            if "type" in rope and "rope_type" not in rope:
                rope["rope_type"] = rope.pop("type")
            if rope.get("rope_type", "default") == "default":
                rope = {}
            n_heads = c["num_attention_heads"]
            sliding = None
            if model_type == "mistral" or (
                model_type == "qwen2" and c.get("use_sliding_window", False)
            ):
                sliding = c.get("sliding_window")
            return cls(
                **common,
                intermediate_size=c["intermediate_size"],
                num_kv_heads=c.get("num_key_value_heads") or n_heads,
                head_dim=c.get("head_dim") or c["hidden_size"] // n_heads,
                norm_eps=c.get("rms_norm_eps", 1e-6),
                rope_theta=float(theta),
                rope_scaling=_freeze(rope),
                qkv_bias=True if model_type == "qwen2" else c.get("attention_bias", False),
                o_bias=False if model_type == "qwen2" else c.get("attention_bias", False),
                mlp_bias=c.get("mlp_bias", False),
                tie_word_embeddings=c.get("tie_word_embeddings", False),
                sliding_window=sliding,
            )
        except KeyError as e:
            raise ConfigError(f"{source}: missing required field {e.args[0]!r}") from None

    # ---------------------------------------------------------------- GGUF

    @classmethod
    def from_gguf_metadata(
        cls,
        meta: dict[str, Any],
        tensor_shapes: dict[str, tuple[int, ...]],
        dtype: str = "float32",
        source: str = "GGUF file",
        rope_freq_factors: Any = None,
    ) -> ModelConfig:
        """Builds the config from GGUF key/values (decoded to Python values) and tensor shapes.

        `rope_freq_factors`: the values of the file's `rope_freqs.weight` tensor where it
        has one (Llama 3.1/3.2: their "llama3" RoPE scaling, which llama.cpp stores as one
        divisor per frequency instead of in the metadata); None where it has none."""
        arch = meta.get("general.architecture")
        if arch not in ("llama", "qwen2", "gemma3"):
            raise ConfigError(
                f"{source}: unknown GGUF architecture {arch!r}; supported: llama, qwen2, gemma3"
            )

        def get(key, default=None, required=True):
            full = f"{arch}.{key}"
            if full in meta:
                return meta[full]
            if required and default is None:
                raise ConfigError(f"{source}: GGUF metadata lacks {full!r}")
            return default

        n_heads = int(get("attention.head_count"))
        hidden = int(get("embedding_length"))
        vocab = meta.get(f"{arch}.vocab_size") or tensor_shapes["token_embd.weight"][0]
        head_dim = int(get("rope.dimension_count", hidden // n_heads, required=False))
        head_dim = int(get("attention.key_length", head_dim, required=False))  # Gemma: no rope.*
        rope = {}
        if get("rope.scaling.type", "none", required=False) == "linear":
            rope = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
        if rope_freq_factors is not None:
            factors = tuple(float(f) for f in np.asarray(rope_freq_factors).reshape(-1))
            if rope:
                raise ConfigError(
                    f"{source}: has both rope.scaling.type 'linear' and a rope_freqs.weight "
                    "tensor; one RoPE scaling is supported at a time"
                )
            if len(factors) != head_dim // 2:
                raise ConfigError(
                    f"{source}: rope_freqs.weight has {len(factors)} values; this model's "
                    f"head_dim {head_dim} needs {head_dim // 2} (one per RoPE frequency)"
                )
            rope = {"rope_type": "frequency_factors", "factors": factors}
        eos = meta.get("tokenizer.ggml.eos_token_id")
        gemma: dict[str, Any] = {}
        if arch == "gemma3":
            # llama.cpp (and HF loading the GGUF) fix what the metadata leaves out: every 6th
            # layer global, local RoPE base 10000, attention scale 1/sqrt(key_length).
            n = int(get("block_count"))
            gemma = {
                "sliding_window": int(get("attention.sliding_window")),
                "layer_types": tuple(SLIDING if (i + 1) % 6 else FULL for i in range(n)),
                "rope_local_theta": 10_000.0,
                "query_pre_attn_scalar": float(head_dim),
            }
        return cls(
            model_type={"llama": "llama", "qwen2": "qwen2", "gemma3": GEMMA3}[arch],
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=n_heads,
            num_kv_heads=int(get("attention.head_count_kv", n_heads, required=False)),
            head_dim=head_dim,
            max_position_embeddings=int(get("context_length", 2048, required=False)),
            norm_eps=float(get("attention.layer_norm_rms_epsilon")),
            rope_theta=float(get("rope.freq_base", 10000.0, required=False)),
            rope_scaling=_freeze(rope),
            qkv_bias="blk.0.attn_q.bias" in tensor_shapes,
            tie_word_embeddings="output.weight" not in tensor_shapes,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=() if eos is None else (int(eos),),
            pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
            dtype=dtype,
            **gemma,
        )


def _gemma3_fields(c: dict[str, Any], source: str) -> dict[str, Any]:
    """The ModelConfig fields of an HF `gemma3_text` config.json (beyond the common ones)."""
    act = c.get("hidden_activation") or c.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ConfigError(f"{source}: hidden_activation={act!r}; Gemma 3 uses gelu_pytorch_tanh")
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if c.get(key) is not None:
            raise ConfigError(
                f"{source}: {key}={c[key]} is not supported (Gemma 3 has none; set it to null)"
            )
    if c.get("use_bidirectional_attention"):
        raise ConfigError(
            f"{source}: use_bidirectional_attention=true is not supported (a causal LM is needed)"
        )
    n = c["num_hidden_layers"]
    layer_types = c.get("layer_types")
    if not layer_types:  # older configs: every `sliding_window_pattern`-th layer is global
        pattern = c.get("sliding_window_pattern") or 6
        layer_types = [SLIDING if (i + 1) % pattern else FULL for i in range(n)]
    params = c.get("rope_parameters") or {}
    full = dict(params.get(FULL) or {})
    local = dict(params.get(SLIDING) or {})
    full.update(c.get("rope_scaling") or {})
    theta = full.pop("rope_theta", c.get("rope_theta", 1_000_000.0))
    local_theta = local.pop("rope_theta", c.get("rope_local_base_freq", 10_000.0))
    if local.get("rope_type", "default") != "default":
        raise ConfigError(
            f"{source}: sliding-attention rope_type {local['rope_type']!r} is not "
            f"supported (only default)"
        )
    if "type" in full and "rope_type" not in full:
        full["rope_type"] = full.pop("type")
    if full.get("rope_type", "default") == "default":
        full = {}
    n_heads = c["num_attention_heads"]
    return {
        "intermediate_size": c["intermediate_size"],
        "num_kv_heads": c.get("num_key_value_heads") or n_heads,
        "head_dim": c.get("head_dim") or c["hidden_size"] // n_heads,
        "norm_eps": c.get("rms_norm_eps", 1e-6),
        "rope_theta": float(theta),
        "rope_scaling": _freeze(full),
        "rope_local_theta": float(local_theta),
        "qkv_bias": c.get("attention_bias", False),
        "o_bias": c.get("attention_bias", False),
        "tie_word_embeddings": c.get("tie_word_embeddings", True),
        "sliding_window": c.get("sliding_window"),
        "layer_types": tuple(layer_types),
        "query_pre_attn_scalar": float(c.get("query_pre_attn_scalar", 256)),
    }


def _freeze(d: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in d.items()))


def rope_inv_freq(config: ModelConfig, layer_type: str = FULL) -> np.ndarray:
    """Inverse RoPE frequencies [head_dim // 2], as HF computes them (default, linear, llama3;
    "frequency_factors" as llama.cpp applies a GGUF's `rope_freqs.weight`).

    Gemma 3's SLIDING layers use their own base (`rope_local_theta`) and no scaling."""
    dim = config.head_dim
    local = layer_type == SLIDING and config.rope_local_theta is not None
    theta = config.rope_local_theta if local else config.rope_theta
    inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = {} if local else config.rope_scaling_dict
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(is_medium, smoothed, scaled)
    elif rope_type == "frequency_factors":  # as llama.cpp applies rope_freqs.weight
        inv_freq = inv_freq / np.asarray(scaling["factors"], np.float64)
    return inv_freq.astype(np.float32)


def full_size_shapes() -> dict[str, ModelConfig]:
    """Full-size configs for random-weight benchmarks and shape tests, which need no model
    file: Llama-3-8B, and the shapes of the two embedded models (SmolLM2-135M-Instruct,
    Gemma 3 270M; their real configs come from their GGUF files). bfloat16."""
    return {
        "llama3-8b": ModelConfig.from_hf(
            {
                "model_type": "llama",
                "vocab_size": 128256,
                "hidden_size": 4096,
                "intermediate_size": 14336,
                "num_hidden_layers": 32,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
                "max_position_embeddings": 8192,
                "rms_norm_eps": 1e-5,
                "rope_theta": 500000.0,
                "rope_scaling": {
                    "factor": 8.0,
                    "high_freq_factor": 4.0,
                    "low_freq_factor": 1.0,
                    "original_max_position_embeddings": 8192,
                    "rope_type": "llama3",
                },
            },
            dtype="bfloat16",
        ),
        "smollm2-135m": ModelConfig.from_hf(
            {
                "model_type": "llama",
                "vocab_size": 49152,
                "hidden_size": 576,
                "intermediate_size": 1536,
                "num_hidden_layers": 30,
                "num_attention_heads": 9,
                "num_key_value_heads": 3,
                "max_position_embeddings": 8192,
                "rms_norm_eps": 1e-5,
                "rope_theta": 100000.0,
                "tie_word_embeddings": True,
                "eos_token_id": 2,
            },
            dtype="bfloat16",
        ),
        "gemma3-270m": ModelConfig.from_hf(
            {
                "model_type": "gemma3_text",
                "vocab_size": 262144,
                "hidden_size": 640,
                "intermediate_size": 2048,
                "num_hidden_layers": 18,
                "num_attention_heads": 4,
                "num_key_value_heads": 1,
                "head_dim": 256,
                "max_position_embeddings": 32768,
                "rms_norm_eps": 1e-6,
                "sliding_window": 512,
                "sliding_window_pattern": 6,
                "query_pre_attn_scalar": 256,
                "rope_theta": 1000000.0,
                "rope_local_base_freq": 10000.0,
                "hidden_activation": "gelu_pytorch_tanh",
            },
            dtype="bfloat16",
        ),
    }
