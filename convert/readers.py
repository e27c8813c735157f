"""Tensor sources: safetensors (single or sharded), PyTorch `.bin` (single or sharded) and
GGUF files, each listing its tensors (name -> shape and file) cheaply and then yielding
them one at a time as numpy arrays, so that a conversion never holds the whole source in
memory next to the result.

safetensors is read directly (header + `np.memmap`), which covers bfloat16 without torch;
`.bin` needs torch; GGUF uses the `gguf` package (`GGUFReader`, `gguf.quants.dequantize`).
A file that cannot be read raises `SourceError` naming it. No name mapping happens here.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np


class SourceError(ValueError):
    """A source file that cannot be read (missing, truncated, corrupt, or a missing reader)."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    file: Path
    dtype: str = ""


class TensorSource:
    """Base: `tensors` lists name -> TensorInfo; `iter_arrays` yields (name, np.ndarray)."""

    kind: str = ""
    files: tuple[Path, ...] = ()

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        raise NotImplementedError

    def iter_arrays(self) -> Iterator[tuple[str, np.ndarray]]:
        raise NotImplementedError


# ------------------------------------------------------------------ safetensors

_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
}


def _safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parses and checks the header; returns ({name: entry}, offset of the data section)."""
    bad = f"{path}: truncated or corrupt safetensors file"
    fix = "re-download or re-save the checkpoint"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SourceError(f"{bad} (only {size} bytes); {fix}")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise SourceError(f"{bad} (header of {n} bytes, file of {size}); {fix}")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise SourceError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SourceError(f"{bad} (header is not JSON: {e}); {fix}") from None
    if not isinstance(header, dict):
        raise SourceError(f"{bad} (header is not a JSON object); {fix}")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for name, e in header.items():
        try:
            dtype = np.dtype(_ST_DTYPES[e["dtype"]])
            begin, end = e["data_offsets"]
            count = int(np.prod(e["shape"], dtype=np.int64))
        except (KeyError, TypeError, ValueError):
            raise SourceError(f"{bad} (bad header entry for tensor {name!r}: {e}); {fix}") from None
        if end > data_size:
            raise SourceError(
                f"{bad}: tensor {name!r} ends at byte {end} of the data section, "
                f"which has only {data_size} bytes; {fix}"
            )
        if end - begin != count * dtype.itemsize:
            raise SourceError(
                f"{bad}: tensor {name!r} has {end - begin} bytes for shape "
                f"{e['shape']} {e['dtype']}; {fix}"
            )
    return header, 8 + n


class SafetensorsSource(TensorSource):
    kind = "safetensors"

    def __init__(self, files: list[Path]):
        self.files = tuple(files)
        self._headers = {f: _safetensors_header(f) for f in self.files}
        self._tensors: dict[str, TensorInfo] = {}
        for f, (header, _) in self._headers.items():
            for name, e in header.items():
                if name in self._tensors:
                    raise SourceError(f"{f}: tensor {name!r} also in {self._tensors[name].file}")
                self._tensors[name] = TensorInfo(tuple(e["shape"]), f, e["dtype"])

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return self._tensors

    def iter_arrays(self) -> Iterator[tuple[str, np.ndarray]]:
        for f, (header, data_start) in self._headers.items():
            mm = np.memmap(f, dtype=np.uint8, mode="r")
            try:
                for name, e in header.items():
                    begin, end = e["data_offsets"]
                    raw = mm[data_start + begin : data_start + end]
                    # a view of the memmap: the consumer makes the one copy it keeps
                    yield name, raw.view(_ST_DTYPES[e["dtype"]]).reshape(e["shape"])
            finally:
                del mm


# ------------------------------------------------------------------ torch .bin


def _torch_load(path: Path) -> dict:
    try:
        import torch
    except ImportError:
        raise SourceError(
            f"{path}: reading PyTorch .bin checkpoints needs torch; `pip install torch` (the CPU "
            f"build is enough), or convert the checkpoint to safetensors"
        ) from None
    if not path.is_file():
        raise SourceError(f"{path}: file not found")
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)  # legacy format
    except Exception as e:  # noqa: BLE001 (torch raises many kinds; all mean "unreadable")
        raise SourceError(
            f"{path}: cannot read the PyTorch checkpoint ({type(e).__name__}: {e})"
            f"; the file is truncated or corrupt: re-download or re-save it"
        ) from None
    if not isinstance(sd, dict):
        raise SourceError(f"{path}: holds a {type(sd).__name__}, not a state dict")
    return sd


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()  # shares the (mmap'd) storage: the consumer makes the one copy it keeps


class TorchBinSource(TensorSource):
    kind = "pytorch_bin"

    def __init__(self, files: list[Path]):
        self.files = tuple(files)
        self._tensors: dict[str, TensorInfo] = {}
        for f in self.files:  # mmap: listing reads no tensor data
            sd = _torch_load(f)
            for name, t in sd.items():
                self._tensors[name] = TensorInfo(tuple(t.shape), f, str(t.dtype))
            del sd

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return self._tensors

    def iter_arrays(self) -> Iterator[tuple[str, np.ndarray]]:
        for f in self.files:
            sd = _torch_load(f)
            for name in list(sd):
                yield name, _torch_to_numpy(sd.pop(name))
            del sd


# ------------------------------------------------------------------ GGUF


def gguf_field_value(field) -> Any:
    """A GGUF key/value decoded to Python (str, int, float, bool, or a list of them)."""
    import gguf

    types = field.types
    if not types:
        return None
    if types[0] == gguf.GGUFValueType.ARRAY:
        sub = types[-1] if len(types) > 1 else None
        if sub == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        return [
            field.parts[i].tolist()[0] if len(field.parts[i]) == 1 else field.parts[i].tolist()
            for i in field.data
        ]
    if types[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    v = field.parts[field.data[0]].tolist()
    v = v[0] if len(v) == 1 else v
    if types[0] == gguf.GGUFValueType.BOOL:
        return bool(v)
    return v


# The last GGUF file parsed, by (path, size, mtime): converting one reads its tensors and
# then its tokenizer, and parsing the metadata (a 49152-token vocabulary and its merges) is
# most of the cost (~5 s of CPU for SmolLM2), so it is parsed once. The reader memory-maps
# the file read-only.
_LAST_READER: dict[tuple, Any] = {}


def gguf_reader(path: Path):
    """`gguf.GGUFReader(path)`, reused while the file's size and mtime are unchanged."""
    import gguf

    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _LAST_READER:
        reader = gguf.GGUFReader(path)
        _LAST_READER.clear()
        _LAST_READER[key] = reader
    return _LAST_READER[key]


class GGUFSource(TensorSource):
    """A GGUF file; shapes are given in HF row-major order (GGUF `ne` reversed)."""

    kind = "gguf"

    def __init__(self, path: Path):
        path = Path(path)
        self.files = (path,)
        if not path.is_file():
            raise SourceError(f"{path}: file not found")
        try:
            self.reader = gguf_reader(path)
        except Exception as e:  # noqa: BLE001 (the reader raises many kinds)
            raise SourceError(
                f"{path}: cannot read the GGUF file ({type(e).__name__}: {e}); it "
                f"is truncated or corrupt: re-download it"
            ) from None
        size = path.stat().st_size
        self._tensors: dict[str, TensorInfo] = {}
        self._by_name = {}
        for t in self.reader.tensors:
            end = int(t.data_offset) + int(t.n_bytes)
            if end > size or t.data.nbytes != int(t.n_bytes):
                raise SourceError(
                    f"{path}: truncated GGUF file: tensor {t.name!r} needs bytes up "
                    f"to {end}, the file has {size}; re-download it"
                )
            shape = tuple(int(n) for n in reversed(t.shape.tolist()))
            self._tensors[t.name] = TensorInfo(shape, path, t.tensor_type.name)
            self._by_name[t.name] = t

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return self._tensors

    def metadata(self, skip_large_arrays: bool = True) -> dict[str, Any]:
        """Key/values decoded to Python values (the tokenizer's big arrays skipped by default)."""
        import gguf

        out = {}
        for k, f in self.reader.fields.items():
            if (
                skip_large_arrays
                and f.types
                and f.types[0] == gguf.GGUFValueType.ARRAY
                and len(f.data) > 1024
            ):
                continue
            out[k] = gguf_field_value(f)
        return out

    def read(self, name: str) -> np.ndarray:
        from gguf.quants import dequantize

        t = self._by_name[name]
        info = self._tensors[name]
        try:
            x = dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise SourceError(
                f"{info.file}: tensor {name!r} has quantization "
                f"{t.tensor_type.name}, which gguf.quants cannot dequantize ({e}); "
                f"upgrade gguf (pip install -U gguf) or use another quantization"
            ) from None
        return np.asarray(x).reshape(info.shape)

    def iter_arrays(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self._tensors:
            yield name, self.read(name)


# ------------------------------------------------------------------ HF directories

HF_WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


def open_hf_dir(directory: Path) -> TensorSource:
    """The weights of an HF model directory, preferring safetensors over `.bin`."""
    directory = Path(directory)
    for name in HF_WEIGHT_FILES:
        p = directory / name
        if not p.is_file():
            continue
        if name.endswith(".index.json"):
            try:
                weight_map = json.loads(p.read_text())["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise SourceError(
                    f"{p}: not a valid shard index ({type(e).__name__}: {e}); "
                    f"re-download or re-save the checkpoint"
                ) from None
            shards = list(dict.fromkeys(weight_map.values()))
            files = [directory / s for s in shards]
            for f in files:
                if not f.is_file():
                    raise SourceError(f"{f}: shard listed in {p} is missing; re-download it")
            src = SafetensorsSource(files) if "safetensors" in name else TorchBinSource(files)
            for tname, shard in weight_map.items():
                if tname not in src.tensors:
                    raise SourceError(
                        f"{directory / shard}: tensor {tname!r}, listed in {p}, "
                        f"is not in the shard; re-download the checkpoint"
                    )
            return src
        return SafetensorsSource([p]) if name.endswith(".safetensors") else TorchBinSource([p])
    raise SourceError(f"{directory}: no weights found (looked for {', '.join(HF_WEIGHT_FILES)})")
