"""Converted-model checkpoints: one directory holding the params (orbax), the config and
the tokenizer.

Layout of a checkpoint directory:

    config.json   {"format": "jaxsparse-checkpoint", "format_version": 1,
                   "model": ModelConfig.to_dict(), "source": {...}}
    params/       orbax checkpoint of the params tree
    tokenizer/    tokenizer.save_pretrained(...) (absent if the source had none)
    COMPLETE      written last (see `jaxsparse.io.atomic_directory`)

It does not convert anything (that is `convert/`) and does not pick a default model
(that is `jaxsparse.loading`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxsparse.config import ModelConfig
from jaxsparse.io import atomic_directory, is_complete, require_complete

FORMAT = "jaxsparse-checkpoint"
FORMAT_VERSION = 1
_FIX = "re-run the conversion (python -m convert SRC OUT --overwrite)"


class CheckpointError(ValueError):
    """A directory that is not a usable jaxsparse checkpoint."""


def is_checkpoint(path: str | Path) -> bool:
    """True for a directory written by `save_checkpoint` (complete or not)."""
    path = Path(path)
    cfg = path / "config.json"
    if not cfg.is_file():
        return is_complete(path) or (path / "params").is_dir()
    try:
        return json.loads(cfg.read_text()).get("format") == FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def save_checkpoint(
    path: str | Path,
    config: ModelConfig,
    params: dict,
    tokenizer: Any = None,
    source: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes a checkpoint atomically; an existing `path` is replaced only with `overwrite`."""
    with atomic_directory(path, overwrite=overwrite) as tmp:
        write_checkpoint_contents(tmp, config, params, tokenizer, source)
    return Path(path)


def write_checkpoint_contents(
    directory: Path,
    config: ModelConfig,
    params: dict,
    tokenizer: Any = None,
    source: dict | None = None,
) -> None:
    """Writes params, config and tokenizer into `directory` (no marker: see `atomic_directory`)."""
    import orbax.checkpoint as ocp

    directory = Path(directory)
    _check_params(config, params)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(directory.absolute() / "params", params)
    ckptr.wait_until_finished()
    ckptr.close()
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory / "tokenizer"))
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": config.to_dict(),
        "source": source or {},
    }
    (directory / "config.json").write_text(json.dumps(meta, indent=2) + "\n")


def read_checkpoint_meta(path: str | Path) -> dict:
    """The checkpoint's config.json, checked: complete, right format, known version."""
    path = require_complete(path, "jaxsparse checkpoint", _FIX)
    try:
        meta = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no config.json; {_FIX}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / 'config.json'}: not valid JSON ({e}); {_FIX}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a jaxsparse checkpoint (config.json has no "
            f"format={FORMAT!r}); convert it with python -m convert"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format_version {meta.get('format_version')} is not supported "
            f"(this jaxsparse reads {FORMAT_VERSION}); {_FIX}"
        )
    return meta


def load_config(path: str | Path) -> ModelConfig:
    return ModelConfig.from_dict(read_checkpoint_meta(path)["model"])


def load_checkpoint(
    path: str | Path,
    sharding: jax.sharding.Sharding | dict | Callable[[tuple[str, ...], Any], Any] | None = None,
    with_tokenizer: bool = True,
) -> tuple[ModelConfig, dict, Any, dict]:
    """Loads (config, params, tokenizer or None, source info) from a checkpoint directory.

    Arrays come back with exactly the saved dtypes and values. `sharding` places them
    straight onto devices: one `jax.sharding.Sharding` for every leaf, a pytree of
    shardings matching the params, or a function `(path_tuple, ShapeDtypeStruct) ->
    Sharding`; None puts everything on the default device.
    """
    import orbax.checkpoint as ocp

    from jaxsparse.models import param_shapes

    path = Path(path).absolute()
    meta = read_checkpoint_meta(path)
    config = ModelConfig.from_dict(meta["model"])
    shapes = param_shapes(config)
    shardings = _resolve_sharding(shapes, sharding)
    target = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )
    ckptr = ocp.StandardCheckpointer()
    try:
        params = ckptr.restore(path / "params", target)
    except Exception as e:  # orbax raises many kinds; name the directory and the fix
        raise CheckpointError(
            f"{path / 'params'}: cannot restore the params ({type(e).__name__}: {e}); {_FIX}"
        ) from e
    finally:
        ckptr.close()
    tokenizer = None
    if with_tokenizer and (path / "tokenizer").is_dir():
        tokenizer = load_saved_tokenizer(path / "tokenizer")
    return config, params, tokenizer, meta.get("source", {})


def load_saved_tokenizer(path: str | Path) -> Any:
    """The tokenizer saved in a checkpoint's `tokenizer/` directory (`save_pretrained`).

    `AutoTokenizer` would build the class that `tokenizer_config.json` names; this calls that
    class directly when transformers exports it, which gives the same tokenizer without
    `AutoTokenizer`'s import of transformers' model-config code, which imports torch when
    torch is installed (about 3 s per process on 2 cores). Other directories go through
    `AutoTokenizer`.
    """
    import transformers

    path = Path(path)
    try:
        name = json.loads((path / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        name = None
    cls = (
        getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
    )
    if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedTokenizerBase):
        return cls.from_pretrained(str(path))
    return transformers.AutoTokenizer.from_pretrained(str(path))


def _resolve_sharding(shapes: dict, sharding) -> dict:
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda _: sharding, shapes)
    if callable(sharding):
        return jax.tree_util.tree_map_with_path(
            lambda p, s: sharding(tuple(k.key for k in p), s), shapes
        )
    return sharding


def _check_params(config: ModelConfig, params: dict) -> None:
    """Refuses to save params that do not match the config (names, shapes, dtype)."""
    from jaxsparse.models import param_shapes

    want = {
        jax.tree_util.keystr(p): s
        for p, s in jax.tree_util.tree_flatten_with_path(param_shapes(config))[0]
    }
    got = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    if set(want) != set(got):
        raise CheckpointError(
            f"params do not match the config: missing {sorted(set(want) - set(got))}"
            f", unexpected {sorted(set(got) - set(want))}"
        )
    for k, s in want.items():
        x = got[k]
        if tuple(x.shape) != tuple(s.shape) or np.dtype(x.dtype) != np.dtype(s.dtype):
            raise CheckpointError(
                f"param {k}: expected {s.shape} {s.dtype}, found {tuple(x.shape)} {x.dtype}"
            )
