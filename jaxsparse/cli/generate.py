"""`jaxsparse generate`: text generation from the command line (the work is in
`jaxsparse.generate`).

`--model` takes a converted checkpoint directory, an HF directory or a `.gguf` file;
without it, the embedded default model (SmolLM2-135M-Instruct). Several `--prompt`s (or
`--prompt-file`, one prompt a line) are generated as one batch. `--json` prints one JSON
object: `text` and `tokens` (lists when there are several prompts), `prompt_tokens`,
`prefill_tokens_per_s`, `decode_tokens_per_s` (summed over the batch's sequences, as
`decode_tokens_per_s_basis` says) and `decode_tokens_per_s_per_sequence`, both over the
whole decode loop as the caller waits for it, `decode_s`, `compile_s` (reported apart),
and with a sparsity state, `measured_sparsity` (mean zero fraction per sparsified point
over every decoded token). `--stream` prints the text as it is generated, every
`--stream-chunk` tokens (with `--json`: one `{"delta": ...}` line per chunk, then the
object).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from jaxsparse.cli.common import (
    add_mesh_argument,
    add_model_arguments,
    at_least,
    in_interval,
    load_model_for,
    mesh_for,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    p.add_argument("--prompt-file", help="a text file with one prompt per line")
    p.add_argument(
        "--max-new-tokens",
        type=at_least(1),
        default=64,
        help="tokens to generate at most per prompt",
    )
    p.add_argument(
        "--temperature",
        type=at_least(0.0, float),
        default=0.0,
        help="sampling temperature; 0 is greedy",
    )
    p.add_argument(
        "--top-k", type=at_least(0), default=0, help="keep the k most likely tokens (0: off)"
    )
    p.add_argument(
        "--top-p",
        type=in_interval(0.0, 1.0, lo_open=True),
        default=1.0,
        help="nucleus sampling mass (1: off)",
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument(
        "--sparsity-state",
        metavar="DIR",
        help="a sparsity state directory (calibrate, learn, train-predictors)",
    )
    p.add_argument(
        "--sparse-prefill",
        action="store_true",
        help="apply the sparsity state to the prompt too (default: dense prefill)",
    )
    p.add_argument(
        "--kernels",
        choices=("auto", "xla", "pallas"),
        default="auto",
        help="decode matmuls with a sparsity state: pallas kernels or masked dense "
        "XLA (auto: pallas on GPU/TPU for a single prompt; for a batch, pallas on a GPU "
        "only where the state's target sparsity S leaves an expected union of active "
        "rows 1 - S^B of at most 0.6 (teal-like methods), else xla, where the kernels "
        "are slower; xla on CPU, where they would only run as their pure-jnp references)",
    )
    p.add_argument(
        "--stream", action="store_true", help="print the text as it is generated (one prompt)"
    )
    p.add_argument(
        "--stream-chunk",
        type=at_least(1),
        default=32,  # generate.STREAM_CHUNK
        help="with --stream: tokens per printed chunk (the decode loop returns "
        "to the host once per chunk)",
    )
    p.add_argument(
        "--command-buffers",
        action="store_true",
        help="compile the decode loop with XLA's command buffers (CUDA graphs on a GPU: "
        "`jaxsparse.generate.COMMAND_BUFFERS`; no speedup measured on an H200)",
    )
    add_mesh_argument(p, "generation")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        path = Path(args.prompt_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--prompt-file {path}: cannot read it ({e})") from None
        prompts += [line for line in lines if line.strip()]
        if not lines or not any(line.strip() for line in lines):
            raise ValueError(f"--prompt-file {path}: has no non-empty line")
    if not prompts:
        raise ValueError("give a prompt: --prompt TEXT (or --prompt-file FILE)")
    return prompts


def run(args: argparse.Namespace) -> int:
    from jaxsparse.generate import Generator, SamplingParams, default_kernels
    from jaxsparse.sparsity import read_state_meta

    # Every argument is checked before the model loads (argparse checked the numbers).
    prompts = _prompts(args)
    if args.stream and len(prompts) > 1:
        raise ValueError(
            f"--stream takes one prompt ({len(prompts)} given); drop --stream to generate a batch"
        )
    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    if args.sparsity_state:
        read_state_meta(args.sparsity_state)
    elif args.sparse_prefill:
        raise ValueError("--sparse-prefill needs --sparsity-state DIR")
    mesh = mesh_for(args)
    lm = load_model_for(args)
    thresholds = None
    kernels = default_kernels("dense", len(prompts))
    if args.sparsity_state:
        from jaxsparse.sparsity import load_state

        state = load_state(args.sparsity_state, config=lm.config)
        thresholds = state.thresholds_for_model()
        kernels = default_kernels(
            state.method, len(prompts), args.kernels, thresholds, state.target_sparsity
        )
    gen = Generator(
        lm.config,
        lm.params,
        lm.tokenizer,
        kernels=kernels,
        mesh=mesh,
        command_buffers=args.command_buffers,
    )
    kwargs = {"chat": args.chat, "thresholds": thresholds, "sparse_prefill": args.sparse_prefill}
    if args.stream:
        for chunk in gen.stream(
            prompts, args.max_new_tokens, sampling, chunk_tokens=args.stream_chunk, **kwargs
        ):
            if chunk.texts[0]:
                print(
                    json.dumps({"delta": chunk.texts[0]}) if args.json else chunk.texts[0],
                    end="\n" if args.json else "",
                    flush=True,
                )
            r = chunk.result
        texts = [gen.decode(t) for t in r.tokens]
        if not args.json:
            print()
    else:
        texts, r = gen.generate(prompts, args.max_new_tokens, sampling, **kwargs)
    one = len(prompts) == 1

    def rate(x: float) -> float | None:  # NaN (nothing decoded) is not valid JSON
        return None if math.isnan(x) else x

    out = {
        "model": lm.source,
        "text": texts[0] if one else texts,
        "tokens": r.tokens[0] if one else r.tokens,
        "prompt_tokens": r.prompt_tokens[0] if one else r.prompt_tokens,
        "prefill_tokens_per_s": rate(r.prefill_tokens_per_s),
        "decode_tokens_per_s": rate(r.decode_tokens_per_s),
        "decode_tokens_per_s_basis": "summed over the batch's sequences",
        "decode_tokens_per_s_per_sequence": rate(r.decode_steps_per_s),
        "decode_s": r.decode_s,
        "decode_steps": r.decode_steps,
        "compile_s": r.compile_s,
        "dtype": lm.config.dtype,
        "kernels": kernels.mode,
        "mesh": None if mesh is None else dict(mesh.shape),
        "command_buffers": gen.command_buffers,
    }
    if r.measured_sparsity is not None:
        out["measured_sparsity"] = r.measured_sparsity
        out["sparsity_state"] = args.sparsity_state
    if args.json:
        print(json.dumps(out))
    else:
        for prompt, text in zip(prompts, [] if args.stream else texts):
            print(text if one else f"--- {prompt!r}\n{text}")
        stats = (
            f"prefill {r.prefill_tokens_per_s:.1f} tok/s, decode "
            f"{r.decode_tokens_per_s:.1f} tok/s, compile {r.compile_s:.1f} s"
        )
        if r.measured_sparsity is not None:
            stats += ", measured sparsity " + ", ".join(
                f"{k} {v:.3f}" for k, v in r.measured_sparsity.items() if v > 0
            )
        print(f"[{stats}]", file=sys.stderr)
    return 0
