"""Checkpoint conversion: HF directories (safetensors, sharded, PyTorch .bin) and GGUF files
(dequantized) -> params -> a jaxsparse checkpoint directory (orbax).

Public API:
    convert(src, out, dtype="float32", overwrite=False) -> Path   write a checkpoint
    read_model(src, dtype="float32") -> ConvertedModel             convert in memory
    load_tokenizer(src)                                            the source's tokenizer
    main(argv) -> int                                              `python -m convert`
    ConversionError, SourceError                                   what a bad source raises
"""

from convert.cli import main
from convert.converter import (
    ConversionError,
    ConvertedModel,
    convert,
    load_tokenizer,
    read_model,
    source_kind,
)
from convert.readers import SourceError

__all__ = ["ConversionError", "ConvertedModel", "SourceError", "convert", "load_tokenizer",
           "main", "read_model", "source_kind"]
