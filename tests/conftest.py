"""Shared pytest fixtures (session-scoped: each is built once per test run).

- `smollm2_gguf`: path of the embedded default model's GGUF (SmolLM2-135M-Instruct, Q4_1).
- `smollm2`: that model loaded by `jaxsparse.loading.load_model()` (float32, a LoadedModel);
  the first run converts it into the cache (~1 min), later runs load it in seconds.
- `smollm2_hf`: the same GGUF loaded by HF transformers in PyTorch float32 (~40 s), the
  reference to compare against.
- `tiny_hf_models`: tiny random HF models of every supported architecture, saved to disk
  (see `TINY_HF_CONFIGS`); a dict name -> TinyHFModel.
- `tiny_hf_tools`: the helpers that build and save them (`make_tiny_hf_model`, `save_torch_bin`).
- `fresh_block_traces`: for a test that replaces (spies on) a function the decoder blocks
  call: the blocks are traced once per shape (`jaxsparse.models.llama._apply_block`), so
  their traces are dropped before the test (the spy gets traced in) and after it.

Add new fixtures here only if several test packages use them.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# One persistent XLA compilation cache for the test session, shared by this process and the
# `jaxsparse`, notebook and README subprocesses it starts (they inherit the environment):
# the same SmolLM2 prefill and decode loop compile once instead of in every CLI run. Set
# before anything imports jax, which reads it then. A cache given from outside is kept.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxsparse-xla-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)

# name -> (transformers config class name, kwargs). Small, but with GQA, biases, RoPE
# scaling, tied embeddings, sliding windows, Gemma 3 and OPT's variants all exercised.
_LLAMA = {
    "vocab_size": 211,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5,
}
_OPT = {
    "vocab_size": 211,
    "hidden_size": 48,
    "ffn_dim": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 64,
    "pad_token_id": 1,
}
TINY_HF_CONFIGS = {
    "llama": (
        "LlamaConfig",
        dict(_LLAMA, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    ),
    "llama3_rope": (
        "LlamaConfig",
        dict(
            _LLAMA,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8,
            },
        ),
    ),
    "llama_tied": (
        "LlamaConfig",
        dict(
            _LLAMA,
            tie_word_embeddings=True,
            num_key_value_heads=4,
            rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        ),
    ),
    "mistral": (
        "MistralConfig",
        dict(_LLAMA, num_key_value_heads=1, sliding_window=5, head_dim=16),
    ),
    "qwen2": (
        "Qwen2Config",
        dict(_LLAMA, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    ),
    # Gemma 3: sliding (window 4) and global layers with their own RoPE bases, q/k norms,
    # an attention scale that is not head_dim, tied embeddings.
    "gemma3": (
        "Gemma3TextConfig",
        dict(
            _LLAMA,
            num_hidden_layers=3,
            head_dim=16,
            sliding_window=4,
            query_pre_attn_scalar=24,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 50.0},
            },
        ),
    ),
    "opt": ("OPTConfig", dict(_OPT, do_layer_norm_before=True)),
    "opt_post_ln": ("OPTConfig", dict(_OPT, do_layer_norm_before=False)),
    "opt_proj": ("OPTConfig", dict(_OPT, word_embed_proj_dim=32)),
}


@dataclasses.dataclass
class TinyHFModel:
    name: str
    torch_model: object  # the HF *ForCausalLM, float32, eval mode, eager attention
    safetensors_dir: Path  # save_pretrained (model.safetensors)
    bin_dir: Path  # torch.save of the state dict (pytorch_model.bin), as older checkpoints


def make_tiny_hf_model(name: str, seed: int = 0):
    """A tiny HF model with random, non-trivial weights (std 0.15-0.5, norms around 1)."""
    import torch
    import transformers

    cls_name, kwargs = TINY_HF_CONFIGS[name]
    config = getattr(transformers, cls_name)(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname and pname.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif pname.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
            elif "embed" in pname:
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return model.eval()


def save_torch_bin(model, directory: Path, shards: int = 1) -> None:
    """Writes config.json and pytorch_model.bin (or `shards` .bin files and their index)."""
    import torch

    directory.mkdir(parents=True)
    model.config.save_pretrained(directory)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if shards == 1:
        torch.save(sd, directory / "pytorch_model.bin")
        return
    names = list(sd)
    weight_map = {}
    for i in range(shards):
        fname = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: sd[k] for k in names[i::shards]}
        torch.save(part, directory / fname)
        weight_map.update({k: fname for k in part})
    (directory / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )


def spread_params(config, seed=0):
    """Random params with larger weights than the default init, so activations spread."""
    import jax

    from jaxsparse.models import init_params

    p = init_params(config, seed)
    leaves, tree = jax.tree.flatten(p)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [
        x + 0.1 * jax.random.normal(k, x.shape) if x.ndim == 2 else x for x, k in zip(leaves, keys)
    ]
    return jax.tree.unflatten(tree, leaves)


@pytest.fixture(scope="session")
def make_params():
    """`spread_params(config, seed=0)`, for test modules (which cannot import conftest)."""
    return spread_params


@pytest.fixture(scope="session")
def tiny_hf_tools():
    """The helpers above, for test modules (which cannot import conftest reliably)."""
    import types

    return types.SimpleNamespace(
        configs=TINY_HF_CONFIGS,
        make_tiny_hf_model=make_tiny_hf_model,
        save_torch_bin=save_torch_bin,
    )


@pytest.fixture(scope="session")
def tiny_hf_models(tmp_path_factory) -> dict[str, TinyHFModel]:
    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("tiny_hf")
    out = {}
    for i, name in enumerate(TINY_HF_CONFIGS):
        model = make_tiny_hf_model(name, seed=i)
        st_dir = root / name / "safetensors"
        model.save_pretrained(st_dir)
        bin_dir = root / name / "bin"
        save_torch_bin(model, bin_dir)
        out[name] = TinyHFModel(name, model, st_dir, bin_dir)
    return out


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from jaxsparse.loading import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def smollm2():
    """The default model as our LoadedModel (float32), from the converted-checkpoint cache."""
    from jaxsparse.loading import load_model

    return load_model()


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf):
    """HF transformers' PyTorch model loaded from the same GGUF, float32, eval mode."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture
def fresh_block_traces():
    """Every block traced anew in the test: a test that patches a kernel in (to count its
    calls) must not run a block traced before the patch. `_apply_block.clear_cache()`
    alone left jax's tracing caches, and a layer could reuse a trace made in an earlier
    test of the same process (seen in CI: one of two layers' calls counted)."""
    import jax

    jax.clear_caches()
    yield
    jax.clear_caches()


@pytest.fixture
def full_precision():
    """float32 matmuls at full precision for the test: XLA on a GPU runs them in TF32 by
    default (about 1e-3 relative), the kernels' float32 dots do not. Modules comparing
    the two take it with `pytestmark = pytest.mark.usefixtures("full_precision")`."""
    import jax

    with jax.default_matmul_precision("highest"):
        yield
