"""Checkpoint conversion: HF directories (safetensors, sharded, PyTorch .bin) and GGUF files
(dequantized) -> params -> a jaxsparse checkpoint directory (orbax). The command line
(`python -m convert`, `jaxsparse convert`) is in `jaxsparse.cli.convert`.

Public API:
    convert(src, out, dtype="float32", overwrite=False) -> Path   write a checkpoint
    read_model(src, dtype="float32") -> ConvertedModel             convert in memory
    load_tokenizer(src)                                            the source's tokenizer
    ConversionError, SourceError                                   what a bad source raises
"""

from convert.converter import (
    ConversionError,
    ConvertedModel,
    convert,
    load_tokenizer,
    read_model,
    source_kind,
)
from convert.readers import SourceError

__all__ = [
    "ConversionError",
    "ConvertedModel",
    "SourceError",
    "convert",
    "load_tokenizer",
    "read_model",
    "source_kind",
]
