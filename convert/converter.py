"""The converter: an HF directory or a GGUF file -> (ModelConfig, params, tokenizer), and
from there a jaxsparse checkpoint directory.

`read_model` checks every source tensor against the family's key map (missing,
unexpected and misshaped tensors are named, with their file) before reading any data, then
streams the tensors one at a time into numpy params of the requested dtype. `convert`
writes the result atomically with `jaxsparse.checkpoint`. Readers live in
`convert.readers`, name maps in `convert.keymaps`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np

from convert.keymaps import (
    HF_IGNORED,
    TensorRule,
    expected_source_shape,
    gguf_key_map,
    hf_canonical_name,
    hf_key_map,
    hf_optional,
)
from convert.readers import GGUFSource, TensorSource, open_hf_dir
from jaxsparse.config import ModelConfig

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
# A GGUF tensor that is part of the config, not a parameter (Llama 3.1/3.2's RoPE scaling).
ROPE_FREQS = "rope_freqs.weight"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class ConversionError(ValueError):
    """A source checkpoint that does not match its config (or that we cannot convert)."""


@dataclasses.dataclass
class ConvertedModel:
    config: ModelConfig
    params: dict  # nested dict of numpy arrays, the layout of `jaxsparse.models.param_shapes`
    source: dict  # where it came from: path, format, files, size, mtime


def source_kind(src: str | Path) -> str:
    """'gguf' for a .gguf file, 'hf' for a directory with config.json; raises otherwise."""
    p = Path(src)
    if p.is_file() and p.suffix == ".gguf":
        return "gguf"
    if p.is_dir() and (p / "config.json").is_file():
        return "hf"
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory")
    raise ConversionError(f"{p}: neither an HF model directory (with config.json) nor a .gguf file")


def check_dtype(dtype: str) -> np.dtype:
    if dtype not in DTYPES:
        raise ConversionError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def read_model(src: str | Path, dtype: str = "float32", progress: bool = False) -> ConvertedModel:
    """Reads and converts the weights of `src` (HF directory or .gguf file) into numpy params."""
    np_dtype = check_dtype(dtype)
    src = Path(src)
    if source_kind(src) == "gguf":
        source = GGUFSource(src)
        meta = source.metadata()
        shapes = {n: i.shape for n, i in source.tensors.items()}
        # Llama 3.1/3.2: the RoPE scaling as one factor per frequency, part of the config
        factors = source.read(ROPE_FREQS) if ROPE_FREQS in shapes else None
        config = ModelConfig.from_gguf_metadata(
            meta, shapes, dtype=dtype, source=str(src), rope_freq_factors=factors
        )
        key_map = gguf_key_map(config, meta["general.architecture"])
        plan = _plan(source, key_map, lambda n: n, {ROPE_FREQS}, config, src)
    else:
        config = ModelConfig.from_hf(src, dtype=dtype)
        source = open_hf_dir(src)
        key_map = hf_key_map(config)
        plan = _plan(
            source,
            key_map,
            lambda n: hf_canonical_name(n, key_map),
            hf_optional(config),
            config,
            src,
        )
    params: dict = {}
    bar = _progress(len(source.tensors), f"converting {src.name}", progress)
    try:
        for name, array in source.iter_arrays():
            bar.update(1)
            rule = plan.get(name)
            if rule is None:
                continue
            x = rule.apply(array)
            del array
            _set(params, rule.path, np.array(x, dtype=np_dtype, order="C"))  # the one copy
    finally:
        bar.close()
    files = source.files
    stat = [f.stat() for f in files]
    info = {
        "path": str(src.absolute()),
        "format": source.kind,
        "files": [f.name for f in files],
        "size": sum(s.st_size for s in stat),
        "mtime_ns": max(s.st_mtime_ns for s in stat),
    }
    return ConvertedModel(config, params, info)


def load_tokenizer(src: str | Path) -> Any:
    """The tokenizer of an HF directory or a GGUF file, or None if the source has none.

    A GGUF's byte-level BPE tokenizer is built from its metadata without torch
    (`convert.gguf_tokenizer`); other GGUF tokenizers (SentencePiece-style, other split
    regexes) go through transformers' GGUF integration, which needs torch.
    """
    from convert.gguf_tokenizer import UnsupportedGGUFTokenizer, gguf_tokenizer

    src = Path(src)
    if source_kind(src) == "gguf":
        try:
            return gguf_tokenizer(src)
        except UnsupportedGGUFTokenizer as e:
            unsupported = e
    # Imported here: AutoTokenizer's import pulls in torch when it is installed (seconds).
    from transformers import AutoTokenizer

    try:
        if source_kind(src) == "gguf":
            try:
                return AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
            except ImportError as e:
                raise ConversionError(
                    f"{unsupported}; transformers can build it from the GGUF, but its GGUF "
                    f"reader needs torch ({e}): pip install torch"
                ) from e
        if not any((src / f).is_file() for f in TOKENIZER_FILES):
            return None
        return AutoTokenizer.from_pretrained(str(src))
    except ConversionError:
        raise
    except Exception as e:
        raise ConversionError(f"{src}: cannot load the tokenizer ({type(e).__name__}: {e})") from e


def convert(
    src: str | Path,
    out: str | Path,
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Converts `src` (HF directory or .gguf file) into a jaxsparse checkpoint at `out`.

    An existing `out` is refused unless `overwrite`; then it is replaced only once the new
    checkpoint is complete. Returns `out`.
    """
    from jaxsparse.checkpoint import write_checkpoint_contents
    from jaxsparse.io import atomic_directory, refuse_existing

    src, out = Path(src), Path(out)
    check_dtype(dtype)
    refuse_existing(out, overwrite)  # before the slow part
    if out.exists() and _same_or_inside(src, out):
        raise ConversionError(f"{out}: the output would replace the source {src}; pick another OUT")
    model = read_model(src, dtype, progress=progress)
    tokenizer = load_tokenizer(src)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        write_checkpoint_contents(tmp, model.config, model.params, tokenizer, model.source)
    return out


# ------------------------------------------------------------------ helpers


def _plan(
    source: TensorSource,
    key_map: dict[str, TensorRule],
    canonical,
    optional: set[str],
    config: ModelConfig,
    src: Path,
) -> dict[str, TensorRule]:
    """Source name -> rule, after checking names and shapes; raises naming every problem."""
    from jaxsparse.models import param_shapes

    ours = {
        tuple(k.key for k in p): s.shape
        for p, s in jax.tree_util.tree_flatten_with_path(param_shapes(config))[0]
    }
    covered = {r.path for r in key_map.values()}
    assert covered == set(ours), (  # a bug in the key maps, not in the user's files
        f"key map does not cover the model: {sorted(set(ours) ^ covered)}"
    )
    plan, unexpected, misshaped, found = {}, [], [], set()
    for name, info in source.tensors.items():
        key = canonical(name)
        rule = key_map.get(key)
        if rule is None:
            if key not in optional and not any(p.match(name) for p in HF_IGNORED):
                unexpected.append(f"{name!r} (in {info.file.name})")
            continue
        found.add(key)
        want = expected_source_shape(rule, ours[rule.path])
        if tuple(info.shape) != want:
            misshaped.append(
                f"{name!r} in {info.file.name}: expected shape {want}, found {tuple(info.shape)}"
            )
        plan[name] = rule
    missing = [k for k in key_map if k not in found]
    problems = []
    what = (
        f"{config.model_type}, {config.num_layers} layers, hidden {config.hidden_size}, "
        f"tie_word_embeddings={config.tie_word_embeddings}"
    )
    cfg_name = "its GGUF metadata" if source.kind == "gguf" else "config.json"
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {_some(unexpected)}")
    if misshaped:
        problems.append(f"misshaped tensors ({len(misshaped)}): {_some(misshaped)}")
    if problems:
        raise ConversionError(
            f"{src}: the weights do not match {cfg_name} ({what}):\n  "
            + "\n  ".join(problems)
            + f"\nThe checkpoint is incomplete or belongs to another model: re-download it, or fix "
            f"{cfg_name}."
        )
    return plan


def _some(names: list[str], n: int = 12) -> str:
    s = ", ".join(names[:n])
    return s + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _same_or_inside(src: Path, out: Path) -> bool:
    s, o = os.path.realpath(src), os.path.realpath(out)
    return s == o or s.startswith(o + os.sep)


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tensor")
