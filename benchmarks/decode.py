"""End-to-end decode speed through the path users run: `Generator.generate_ids` (what
`jaxsparse generate` calls), dense against CHESS, CHESS+ and TEAL states fitted by the
project's own calibration, at batch 1, 4 and 8. Protocol: docs/design.md ("Measuring").

    python benchmarks/decode.py --json OUT [--model llama3-8b|smollm2|smollm2-random|PATH]
        [--sparsity 0.5]

`llama3-8b` is a Llama-3-8B-shaped model with random bf16 weights, fed real text (stdlib
docstrings) through a byte-level tokenizer; `smollm2-random` the same for the default
model's shapes (SmolLM2-135M: 30 layers, d=576, m=1536), for a machine without its GGUF;
`smollm2` the real SmolLM2-135M-Instruct weights. The sparsity states come from `jaxsparse.calibrate.calibrate` on that model and
text (`calibration` split): CHESS's per-channel thresholds `Q_l / E|u_i|`, CHESS+'s q/o
thresholds, TEAL's per-input thresholds. Prompts come from the `evaluation` split.

Per method and batch size, each figure is the median over `--repeats` calls (after one
warm-up call that compiles) of:
- `generator`: `Generator.generate_ids(..., max_new_tokens=--new-tokens)` with the sparsity
  statistics on (the default with a state), its own `decode_s` (the whole on-device loop
  as the caller waits for it; compilation excluded); tokens/s per sequence and summed
  over the batch. Measured sparsity is averaged over every decoded token.
At batch 1 also:
- `reference_loop`: the same decode steps inside a bare `lax.fori_loop` (greedy argmax,
  no statistics, no EOS checks, no token buffer): a ceiling no user runs, to show what the
  product loop costs on top of it.
- `cli`: `jaxsparse generate --json` run in-process (`jaxsparse.cli.main`) with the model
  load replaced by the model already in memory and the state read from disk, its
  `decode_tokens_per_s`.
- `stream`: `Generator.stream_ids(..., chunk_tokens=C)` for each C in `--chunks`, one host
  read per chunk, against the unbroken loop (`--cli-repeats 0` and `--no-reference` skip
  the CLI and the reference).

A method may carry Kernels overrides, to time a kernel-path variant beside the default
in one run: `--methods dense,chess,chess@gate_rule_in_kernel=0` or
`chess@dense_points=ffn_in+q_in+o_in` (fields of `jaxsparse.models.Kernels`, several
joined by `/`, tuple values by `+`); the state is the base method's. Overrides of the
decode attention alone (`@decode_attention=0` for XLA's attention, `@attention_splits=P`)
apply to XLA steps too (dense, and `--kernels auto` from batch 2); the others only to
pallas steps.

The roofline (batch 1) is the bytes a decode step must read (weights the method needs at
its measured per-layer sparsity, KV cache, output projection) over the bandwidth of a
device-to-device copy measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import io
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax
import jax.numpy as jnp

from jaxsparse.config import ModelConfig, full_size_shapes
from jaxsparse.generate import Generator, bucket_length, default_kernels
from jaxsparse.io import write_json_atomic
from jaxsparse.models import build_model, init_cache, param_shapes, prepare_params

METHODS = ("dense", "chess", "chess+", "teal")

LLAMA3_8B = full_size_shapes()["llama3-8b"]
# --model names of random-weight models: their full_size_shapes() config
RANDOM_MODELS = {"llama3-8b": "llama3-8b", "smollm2-random": "smollm2-135m"}


class ByteTokenizer:
    """Real text for a random model: one token per UTF-8 byte (ids 3-258), EOS 2."""

    eos_token_id = 2
    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]

    def __call__(self, text: str) -> dict:
        return {"input_ids": self.encode(text)}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(i - 3 for i in ids if 3 <= i < 259).decode("utf-8", "replace")


def random_params(config: ModelConfig, seed: int = 0) -> dict:
    """Random normal weights (std 0.02; norm scales 1) made on the device, leaf by leaf."""
    shapes = param_shapes(config)
    leaves, _ = jax.tree.flatten_with_path(shapes)
    key = jax.random.key(seed)
    out = []
    for i, (path, s) in enumerate(leaves):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            out.append(jnp.ones(s.shape, s.dtype))
        else:
            k = jax.random.fold_in(key, i)
            out.append(
                jax.jit(
                    lambda k, sh=s.shape, dt=s.dtype: (
                        0.02 * jax.random.normal(k, sh, jnp.float32)
                    ).astype(dt)
                )(k)
            )
    return jax.tree.unflatten(jax.tree.structure(shapes), out)


def prompt_batch(tokenizer, n: int, length: int) -> list[list[int]]:
    """`n` prompts of `length` tokens each, from different documents of the evaluation split."""
    from jaxsparse.data import stdlib_documents

    prompts = []
    for d in stdlib_documents("evaluation"):
        ids = tokenizer.encode(d.text, add_special_tokens=False)
        if len(ids) >= length:
            prompts.append(ids[:length])
        if len(prompts) == n:
            return prompts
    raise ValueError(f"not {n} documents of {length} tokens in the evaluation split")


def reference_loop(config, kernels, params, thresholds, prompt, steps: int, repeats: int):
    """Tokens/s of `steps` greedy decode steps in a bare fori_loop (no statistics, no EOS,
    no token buffer), after a dense prefill of `prompt`: the ceiling for the product loop."""
    model = build_model(config, kernels)
    p = prepare_params(params, config, kernels)
    t = len(prompt)

    @jax.jit
    def prefill(params, tokens, cache):
        logits, cache = build_model(config).apply(
            {"params": params}, tokens, jnp.arange(t)[None], cache, 0, last_only=True
        )
        return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache

    def decode(params, tok, cache, thresholds):
        def body(i, carry):
            tok, cache = carry
            logits, cache = model.apply(
                {"params": params},
                tok[:, None],
                (t + i)[None, None],
                cache,
                t + i,
                thresholds,
                last_only=True,
            )
            return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache

        return jax.lax.fori_loop(0, steps, body, (tok, cache))

    decode = jax.jit(decode, donate_argnums=(2,))
    times = []
    for _ in range(repeats + 1):
        tok, cache = prefill(
            params, jnp.asarray([prompt], jnp.int32), init_cache(config, 1, t + steps + 1)
        )
        jax.block_until_ready(tok)
        t0 = time.perf_counter()
        tok, cache = decode(p, tok, cache, thresholds)
        jax.block_until_ready(tok)
        times.append(time.perf_counter() - t0)
    return steps / statistics.median(times[1:])


def bytes_per_token(
    config, kernels, per_layer: dict[str, list[float]] | None, cache_len: int
) -> float:
    """Bytes of weights (and KV cache) one batch-1 decode step reads at this sparsity: a
    point's rows are skipped only where its projection runs through a kernel (and the
    method sparsifies it: a point it leaves dense is not measured, every row is read)."""
    c = config
    d, m, q, kv = c.hidden_size, c.intermediate_size, c.q_dim, c.kv_dim
    pts = set(kernels.points) if kernels.mode == "pallas" else set()
    total = 0.0
    for i in range(c.num_layers):

        def dens(p, i=i):
            return 1.0 - per_layer[p][i] if (p in pts and p in (per_layer or {})) else 1.0

        total += d * q * dens("q_in") + 2 * d * kv * dens("kv_in") + q * d * dens("o_in")
        up_rows = dens("gate") if "gate" in pts else dens("ffn_in")
        total += d * m * dens("ffn_in") + d * m * up_rows + m * d * dens("down_in")
    total += c.vocab_size * d  # output projection (the embedding gather is negligible)
    total *= jnp.dtype(c.dtype).itemsize
    total += c.num_layers * 2 * cache_len * kv * jnp.dtype(c.dtype).itemsize
    return total


def copy_bandwidth(nbytes: int = 4 << 30, repeats: int = 20) -> float:
    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    f = jax.jit(lambda a: a + jnp.bfloat16(1))
    jax.block_until_ready(f(x))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(x))
        ts.append(time.perf_counter() - t0)
    del x
    return 2 * nbytes / statistics.median(ts)


def cli_tokens_per_s(
    lm,
    state_dir: str | None,
    prompt_text: str,
    new_tokens: int,
    repeats: int,
    command_buffers: bool = False,
) -> float:
    """`jaxsparse generate --json`'s decode_tokens_per_s, in-process, model load replaced."""
    import jaxsparse.cli.generate as cli_generate
    from jaxsparse.cli import main

    argv = ["generate", "--prompt", prompt_text, "--max-new-tokens", str(new_tokens), "--json"]
    if command_buffers:
        argv.append("--command-buffers")
    if state_dir:
        argv += ["--sparsity-state", state_dir]
    saved = cli_generate.load_model_for
    cli_generate.load_model_for = lambda args: lm
    try:
        rates = []
        for _ in range(repeats):
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                if main(argv) != 0:
                    raise RuntimeError(f"jaxsparse {' '.join(argv)} failed")
            rates.append(json.loads(buf.getvalue())["decode_tokens_per_s"])
    finally:
        cli_generate.load_model_for = saved
    return statistics.median(rates)


def median_result(fn, repeats: int):
    """One warm-up call (compiles), then the result with the median decode time, and the
    warm-up's compile time."""
    compile_s = fn().compile_s
    results = sorted((fn() for _ in range(repeats)), key=lambda r: r.decode_s)
    return results[len(results) // 2], compile_s


def load(args):
    from jaxsparse.loading import LoadedModel, load_model

    if args.model in RANDOM_MODELS:
        config = full_size_shapes()[RANDOM_MODELS[args.model]]
        lm = LoadedModel(config, random_params(config), ByteTokenizer(), f"{args.model} random")
        return lm, f"{RANDOM_MODELS[args.model]} shapes, random bf16 weights, byte-level text"
    lm = load_model(None if args.model == "smollm2" else args.model, dtype="bfloat16")
    return lm, f"{Path(lm.source).name} (bf16)"


def method_variant(spec: str) -> tuple[str, dict]:
    """`name@field=value/field=value` -> (name, {field: value}) for
    `dataclasses.replace(Kernels, ...)`: tuple fields split on `+`, bools from 0/1, ints."""
    from jaxsparse.models import Kernels

    name, _, rest = spec.partition("@")
    defaults = {f.name: f.default for f in dataclasses.fields(Kernels)}
    out = {}
    for item in filter(None, rest.split("/")):
        key, eq, value = item.partition("=")
        if not eq or key not in defaults or key in ("mode", "impl", "mesh"):
            raise SystemExit(
                f"--methods {spec!r}: {item!r} is not FIELD=VALUE with a Kernels field "
                f"(one of {sorted(set(defaults) - {'mode', 'impl', 'mesh'})})"
            )
        if isinstance(defaults[key], bool):
            if value not in ("0", "1"):
                raise SystemExit(f"--methods {spec!r}: {key} takes 0 or 1, not {value!r}")
            out[key] = value == "1"
        elif isinstance(defaults[key], int):
            if not value.isdigit():
                raise SystemExit(f"--methods {spec!r}: {key} takes an int, not {value!r}")
            out[key] = int(value)
        else:
            out[key] = tuple(filter(None, value.split("+")))
    return name, out


def run(args) -> dict:
    from jaxsparse.calibrate import calibrate
    from jaxsparse.sparsity import save_state

    lm, name = load(args)
    config, params, tok = lm.config, lm.params, lm.tokenizer
    bw = copy_bandwidth()
    variants = {spec: method_variant(spec) for spec in args.methods}
    sparse = sorted({base for base, _ in variants.values() if base != "dense"})
    t0 = time.perf_counter()
    states = (
        calibrate(
            config,
            params,
            tok,
            sparse,
            [args.sparsity],
            None,
            tokens=args.calibration_tokens,
            seq_len=256,
            batch_size=4,
            model_source=name,
            progress=False,
        )
        if sparse
        else {}
    )
    calibration_s = time.perf_counter() - t0
    prompts = prompt_batch(tok, max(args.batches), args.prompt_len)
    prompt_text = tok.decode(prompts[0])
    tmp = tempfile.mkdtemp()
    rows, skipped = [], []
    for method in args.methods:
        base, overrides = variants[method]
        state = states.get((base, args.sparsity))
        th = None if state is None else state.thresholds_for_model()
        state_dir = None
        if state is not None:
            state_dir = Path(tmp) / base.replace("+", "_plus")
            if not state_dir.exists():  # a variant reuses its base method's state
                save_state(state, state_dir)
            state_dir = str(state_dir)
        gens: dict = {}
        for batch in args.batches:
            if time.time() > args.deadline:
                skipped.append({"method": method, "batch": batch})
                print(f"{method} batch {batch}: skipped (--budget-s)", file=sys.stderr)
                continue
            sp = None if state is None else state.target_sparsity
            kernels = default_kernels(base, batch, args.kernels, th, sp)
            attention_only = set(overrides) <= {"decode_attention", "attention_splits"}
            if overrides and (kernels.mode == "pallas" or attention_only):
                kernels = dataclasses.replace(kernels, **overrides)
            if kernels not in gens:
                gens.clear()  # one prepared layout on the device at a time
                gens[kernels] = Generator(
                    config, params, tok, kernels=kernels, command_buffers=args.command_buffers
                )
            gen = gens[kernels]
            r, compile_s = median_result(
                lambda g=gen, b=batch, t=th: g.generate_ids(
                    prompts[:b],
                    args.new_tokens,
                    thresholds=t,
                    stop_at_eos=False,
                    collect_stats=args.collect_stats,
                ),
                args.repeats,
            )
            row = {
                "method": method,
                "batch": batch,
                "kernels": kernels.mode,
                "kernel_points": list(kernels.points),
                "dense_kernel_points": list(kernels.dense_points),
                "collect_stats": args.collect_stats is not False and th is not None,
                "generator_tokens_per_s_per_sequence": r.decode_steps_per_s,
                "generator_tokens_per_s_summed": r.decode_tokens_per_s,
                "decode_steps": r.decode_steps,
                "compile_s": compile_s,
                "measured_sparsity": r.measured_sparsity,
                "command_buffers": gen.command_buffers,
                "first_ids": r.tokens[0][:16],  # the first prompt's, to compare runs
            }
            if batch == 1:
                # XLA's attention reads every slot of the cache buffer, filled or not.
                cache_len = bucket_length(len(prompts[0])) + args.new_tokens
                nbytes = bytes_per_token(config, kernels, r.measured_sparsity_per_layer, cache_len)
                row["bytes_per_token"] = nbytes
                row["roofline_tokens_per_s"] = bw / nbytes
                row["roofline_fraction"] = r.decode_steps_per_s / (bw / nbytes)
                if args.reference:
                    row["reference_loop_tokens_per_s"] = reference_loop(
                        config, kernels, params, th, prompts[0], r.decode_steps, args.repeats
                    )
                    row["generator_vs_reference"] = (
                        r.decode_steps_per_s / row["reference_loop_tokens_per_s"]
                    )
                if args.cli_repeats and not overrides:  # the CLI runs the base method
                    row["cli_tokens_per_s"] = cli_tokens_per_s(
                        lm,
                        state_dir,
                        prompt_text,
                        args.new_tokens,
                        args.cli_repeats,
                        args.command_buffers,
                    )
                    if args.reference:
                        row["cli_vs_reference"] = (
                            row["cli_tokens_per_s"] / row["reference_loop_tokens_per_s"]
                        )
                # The same compiled loop, stopped every `chunk` steps for a host read.
                row["stream"] = []
                for chunk in args.chunks:
                    s, _ = median_result(
                        lambda g=gen, t=th, c=chunk: _stream(g, prompts[:1], args, t, c),
                        args.repeats,
                    )
                    row["stream"].append(
                        {
                            "chunk_tokens": chunk,
                            "tokens_per_s": s.decode_steps_per_s,
                            "vs_unbroken": s.decode_steps_per_s / r.decode_steps_per_s,
                        }
                    )
            if args.profile:
                row["profile"] = profile_steps(gen, prompts[:batch], th, args, f"{method}_b{batch}")
            rows.append(row)
            print(
                json.dumps({k: v for k, v in row.items() if k != "measured_sparsity"}),
                file=sys.stderr,
            )
        gens.clear()
    for row in rows:
        dense = next(
            (d for d in rows if d["method"] == "dense" and d["batch"] == row["batch"]), None
        )
        row["speedup_vs_dense"] = (
            row["generator_tokens_per_s_per_sequence"]
            / dense["generator_tokens_per_s_per_sequence"]
            if dense is not None
            else float("nan")
        )
    return {
        "benchmark": "decode",
        "model": name,
        "device": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "jax_version": jax.__version__,
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/decode.py " + " ".join(args.argv),
        "target_sparsity": args.sparsity,
        "calibration_tokens": args.calibration_tokens,
        "calibration_s": calibration_s,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "copy_bandwidth_GBps": bw / 1e9,
        "rows": rows,
        "skipped": skipped,
    }


def profile_steps(gen, prompts, th, args, method, devices: int = 1) -> dict:
    """Device-side time of one decode step from `jax.profiler` traces of the product call
    (`generate_ids`): a call of `--new-tokens` tokens minus a call of 1 token (prefill and
    the first step cancel), per kernel kind (benchmarks/profile_decode.py's grouping),
    against the step's wall time in the same traced calls. That wall time carries the
    profiler's own cost, so `idle_ms_per_step` is an upper bound on the gaps between
    kernels; compare the device time with the unprofiled step time (1 / tokens/s). With
    `devices` > 1 the trace holds every device's kernels: counts and times are per
    device (their sum over the devices divided by `devices`)."""
    from profile_decode import kind, traced

    def generate(n):
        return gen.generate_ids(
            prompts, n, thresholds=th, stop_at_eos=False, collect_stats=args.collect_stats
        )

    totals = []
    for n in (args.new_tokens, 1):
        d = Path(args.profile) / re.sub(r"[^\w.-]", "_", f"{method.replace('+', '_plus')}_{n}")
        if n != args.new_tokens:  # --new-tokens is compiled and warm from the timing
            generate(n)
        r, events = traced(lambda n=n: generate(n), d)
        groups: dict[str, list[float]] = {}
        names: dict[str, float] = {}
        calls: dict[str, int] = {}
        for e in events:
            groups.setdefault(kind(e["name"]), []).append(float(e.get("dur", 0.0)))
            names[e["name"][:60]] = names.get(e["name"][:60], 0.0) + float(e.get("dur", 0.0))
            calls[e["name"][:60]] = calls.get(e["name"][:60], 0) + 1
        totals.append((r.decode_s, r.decode_steps, groups, names, calls))
    (wall_n, steps_n, g_n, names_n, calls_n), (wall_1, steps_1, g_1, names_1, calls_1) = totals
    steps = steps_n - steps_1
    per = steps * devices
    by_kind = {
        k: {
            "count_per_step": (len(g_n.get(k, [])) - len(g_1.get(k, []))) / per,
            "ms_per_step": (sum(g_n.get(k, [])) - sum(g_1.get(k, []))) / 1e3 / per,
        }
        for k in g_n
    }
    device_ms = sum(v["ms_per_step"] for v in by_kind.values())
    wall_ms = (wall_n - wall_1) * 1e3 / steps
    top = sorted(
        ((k, (v - names_1.get(k, 0.0)) / 1e3 / per) for k, v in names_n.items()),
        key=lambda kv: -kv[1],
    )[: args.profile_top]
    return {
        "wall_ms_per_step": wall_ms,
        "device_ms_per_step": device_ms,
        "idle_ms_per_step": wall_ms - device_ms,
        "by_kind": by_kind,
        "top_kernels_ms_per_step": dict(top),
        "top_kernels_calls_per_step": {k: (calls_n[k] - calls_1.get(k, 0)) / per for k, _ in top},
        "how": "traced generate_ids of --new-tokens minus of 1 token; decode_s as wall",
    }


def _stream(gen, prompts, args, th, chunk):
    for _, result in gen.stream_ids(
        prompts,
        args.new_tokens,
        thresholds=th,
        stop_at_eos=False,
        collect_stats=args.collect_stats,
        chunk_tokens=chunk,
    ):
        if result is not None:
            return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True, help="where to write the results")
    p.add_argument(
        "--model",
        default="llama3-8b",
        help="llama3-8b or smollm2-random (random weights), smollm2, or a model path",
    )
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--batches", default="1,4,8")
    p.add_argument("--kernels", default="auto", choices=("auto", "pallas", "xla"))
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument(
        "--chunks",
        default="16,32",
        help="streaming chunk sizes measured at batch 1, in tokens (comma list)",
    )
    p.add_argument(
        "--no-reference",
        dest="reference",
        action="store_false",
        help="skip the bare fori_loop reference at batch 1",
    )
    p.add_argument("--profile", help="directory for profiler traces: per-step device time, per row")
    p.add_argument(
        "--profile-top", type=int, default=12, help="kernels listed per profiled row (by time)"
    )
    p.add_argument(
        "--no-stats",
        dest="collect_stats",
        action="store_const",
        const=False,
        default=None,
        help="generate without the zero counts (collect_stats=False; default: with them, "
        "as `jaxsparse generate` runs a state): what counting the zeros costs",
    )
    p.add_argument(
        "--command-buffers",
        action="store_true",
        help="compile the decode loops with XLA's command buffers (`Generator(command_buffers=True)`)",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="start no new (method, batch) row after this many seconds; the JSON lists "
        "the rows skipped (default: no limit)",
    )
    p.add_argument("--calibration-tokens", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--cli-repeats",
        type=int,
        default=2,
        help="CLI runs per method (each compiles anew, as a user's does)",
    )
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.budget_s is not None and args.budget_s <= 0:
        p.error(f"--budget-s {args.budget_s}: must be > 0 (seconds), or left out for no limit")
    args.deadline = time.time() + (args.budget_s if args.budget_s is not None else float("inf"))
    args.methods = [m for m in args.methods.split(",") if m]
    if "dense" not in args.methods:
        args.methods.insert(0, "dense")
    args.batches = [int(b) for b in args.batches.split(",")]
    args.chunks = [int(c) for c in args.chunks.split(",") if c]
    if not 0.0 <= args.sparsity < 1.0:
        p.error(f"--sparsity {args.sparsity}: must be in [0, 1)")
    out = run(args)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, path)
    print(
        f"\n{out['model']} on {out['device']}, jax {out['jax_version']}, "
        f"S={args.sparsity}, copy {out['copy_bandwidth_GBps']:.0f} GB/s; tok/s per sequence"
    )
    print(
        f"{'method':7} {'B':>2} {'kern':6} {'gen':>7} {'xdense':>6} {'ref':>7} {'gen/ref':>7} "
        f"{'cli/ref':>7} {'roof%':>5}  stream/unbroken by chunk; sparsity"
    )

    def f(r, k, fmt):
        return format(r[k], fmt) if k in r else "-".rjust(int(fmt.split(".")[0]))

    for r in out["rows"]:
        sp = " ".join(f"{k}={v:.2f}" for k, v in (r["measured_sparsity"] or {}).items() if v > 0.05)
        st = " ".join(f"{s['chunk_tokens']}:{s['vs_unbroken']:.3f}" for s in r.get("stream", []))
        print(
            f"{r['method']:7} {r['batch']:2d} {r['kernels']:6} "
            f"{r['generator_tokens_per_s_per_sequence']:7.1f} {r['speedup_vs_dense']:6.2f} "
            f"{f(r, 'reference_loop_tokens_per_s', '7.1f')} "
            f"{f(r, 'generator_vs_reference', '7.3f')} {f(r, 'cli_vs_reference', '7.3f')} "
            f"{100 * r['roofline_fraction'] if 'roofline_fraction' in r else float('nan'):5.1f}"
            f"  {st}; {sp}"
        )
    for r in out["rows"]:
        if "profile" in r:
            pr = r["profile"]
            kinds = ", ".join(
                f"{k} {v['count_per_step']:.0f}/{v['ms_per_step']:.2f}"
                for k, v in pr["by_kind"].items()
            )
            print(
                f"profile {r['method']:7} wall {pr['wall_ms_per_step']:.3f} ms/step, device "
                f"{pr['device_ms_per_step']:.3f}, idle {pr['idle_ms_per_step']:.3f}; {kinds}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
