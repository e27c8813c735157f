"""`python -m convert SRC OUT [--dtype bfloat16|float32] [--overwrite]`, also called by
`jaxsparse convert`. Argument parsing and error reporting only; the work is in
`convert.converter`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser(prog: str = "python -m convert") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Convert an HF model directory (safetensors or PyTorch .bin, sharded or "
        "not) or a .gguf file into a jaxsparse checkpoint directory.",
    )
    p.add_argument("src", help="HF model directory (with config.json) or .gguf file")
    p.add_argument("out", help="checkpoint directory to write")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype of the converted params (default: float32)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it exists (only once the new checkpoint is complete)")
    return p


def main(argv: Sequence[str] | None = None, prog: str = "python -m convert") -> int:
    """Runs the conversion CLI; returns the exit status (0 on success, 1 on a user error)."""
    from convert.converter import convert

    args = build_parser(prog).parse_args(argv)
    try:
        out = convert(args.src, args.out, dtype=args.dtype, overwrite=args.overwrite)
    except (ValueError, OSError) as e:  # ConversionError, SourceError, ConfigError, FileExists...
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0
