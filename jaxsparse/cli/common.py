"""Arguments and checks shared by several `jaxsparse` subcommands."""

from __future__ import annotations

import argparse


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="checkpoint dir, HF dir or .gguf (default: the embedded "
                             "SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                        help="params dtype (default: float32, or the checkpoint's)")
