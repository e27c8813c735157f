"""`jaxsparse convert SRC OUT` (also `python -m convert`): argument parsing only; the work is in
`convert.converter`."""

from __future__ import annotations

import argparse

DESCRIPTION = (
    "Convert an HF model directory (safetensors or PyTorch .bin, sharded or not) or a "
    ".gguf file into a jaxsparse checkpoint directory."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="HF model directory (with config.json) or .gguf file")
    p.add_argument("out", help="checkpoint directory to write")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="dtype of the converted params",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT if it exists (only once the new checkpoint is complete)",
    )


def run(args: argparse.Namespace) -> int:
    from convert.converter import convert

    out = convert(args.src, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0
