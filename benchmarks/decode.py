"""End-to-end decode speed: our dense model against CHESS, CHESS+ and TEAL through the
Pallas kernels, batch 1, following DESIGN.md's protocol ("Measuring").

    python benchmarks/decode.py --json OUT [--model llama3-8b|smollm2|PATH] [--sparsity 0.5]

`llama3-8b` is a Llama-3-8B-shaped model with random bf16 weights; `smollm2` the real
SmolLM2-135M-Instruct weights (the embedded default model, or `--model PATH` for its
GGUF/checkpoint). Thresholds are set per layer and sparsification point to the
`--sparsity` quantile of the activations of a prefill over real text (stdlib docstrings),
so that each method reaches the target sparsity; the sparsity measured on the decoded
tokens is recorded beside the speed.

Timing: `--steps` greedy decode steps run inside one jit-compiled `lax.fori_loop` (so
Python dispatch is not what is measured), weights passed as arguments, warmed up, then the
median of `--repeats` runs. The roofline is bytes read per token (weights each method
needs, from the measured sparsity, plus the KV cache and the output projection) over the
bandwidth of a device-to-device copy measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse.config import ModelConfig
from jaxsparse.models import (
    build_model,
    init_cache,
    kernels_for_method,
    param_shapes,
    prepare_params,
)
from jaxsparse.rules import TENSORS
from jaxsparse.sparsity import model_widths

METHODS = ("dense", "chess", "chess+", "teal")
# Points each method thresholds (rules.KERNEL_POINTS lists where zeros flow to kernels).
THRESHOLDED = {
    "dense": (),
    "chess": ("gate",),
    "chess+": ("gate", "q_in", "o_in"),
    "teal": ("q_in", "kv_in", "o_in", "ffn_in", "down_in"),
}

LLAMA3_8B = ModelConfig(
    model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
    num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=8192,
    norm_eps=1e-5, rope_theta=500000.0,
    rope_scaling=(("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                  ("original_max_position_embeddings", 8192), ("rope_type", "llama3")),
    dtype="bfloat16",
)


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
            out.append(jax.jit(lambda k, sh=s.shape, dt=s.dtype: (
                0.02 * jax.random.normal(k, sh, jnp.float32)).astype(dt))(k))
    return jax.tree.unflatten(jax.tree.structure(shapes), out)


def real_text_tokens(tokenizer, vocab: int, n: int) -> np.ndarray:
    from jaxsparse.data import stdlib_documents

    if tokenizer is None:  # random model: token ids from the text's bytes, mod vocab
        text = " ".join(d.text for d in stdlib_documents("calibration")[:50])
        ids = np.frombuffer(text.encode()[: n * 4], np.uint8).astype(np.int64)
        return (ids.reshape(-1, 4) @ np.array([1, 256, 65536, 1 << 24]) % vocab)[:n]
    ids: list[int] = []
    for d in stdlib_documents("calibration"):
        ids += tokenizer(d.text)["input_ids"]
        if len(ids) >= n:
            break
    return np.asarray(ids[:n])


def calibrate_thresholds(config, params, tokens_T, sparsity: float) -> dict:
    """Per layer and point: the `sparsity` quantile of abs(activation) over a prefill."""
    model = build_model(config)

    @jax.jit
    def taps(params, tokens):
        _, v = model.apply({"params": params}, tokens[None], jnp.arange(tokens.shape[0])[None],
                           mutable=["taps"])
        out = {}
        for i in range(config.num_layers):
            t = v["taps"][f"layers_{i}"]
            acts = {"q_in": t["self_attn"]["q_in"][0], "kv_in": t["self_attn"]["kv_in"][0],
                    "o_in": t["self_attn"]["o_in"][0], "ffn_in": t["mlp"]["ffn_in"][0],
                    "gate": t["mlp"]["gate"][0], "down_in": t["mlp"]["down_in"][0]}
            out[f"layers_{i}"] = {
                k: jnp.quantile(jnp.abs(a.astype(jnp.float32)).ravel(), sparsity)
                for k, a in acts.items()}
        return out

    q = jax.device_get(taps(params, jnp.asarray(tokens_T, jnp.int32)))
    return {layer: {k: float(v) for k, v in pts.items()} for layer, pts in q.items()}


def thresholds_for(method, quantiles, config):
    if method == "dense":
        return None
    widths = model_widths(config)
    return {layer: {p: jnp.full((widths[p],), pts[p] if p in THRESHOLDED[method] else 0.0,
                                config.dtype) for p in TENSORS}
            for layer, pts in quantiles.items()}


def make_decode(config, kernels, steps: int):
    model = build_model(config, kernels)

    def decode(params, tok_B, pos_B, cache, index0, thresholds):
        def body(i, carry):
            tok, pos, cache = carry
            logits, cache = model.apply({"params": params}, tok[:, None], pos[:, None], cache,
                                        index0 + i, thresholds, last_only=True)
            return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), pos + 1, cache

        return jax.lax.fori_loop(0, steps, body, (tok_B, pos_B, cache))

    return jax.jit(decode, donate_argnums=(3,))


def measured_sparsity(config, params, thresholds, cache, tok, index0):
    model = build_model(config)
    fn = jax.jit(lambda p, c, th: model.apply(
        {"params": p}, tok[:, None], jnp.full_like(tok, index0)[:, None], c, index0, th,
        last_only=True, mutable=["stats"])[1]["stats"])
    stats = jax.device_get(fn(params, cache, thresholds))
    per_point: dict[str, list[float]] = {}
    for i in range(config.num_layers):
        s = stats[f"layers_{i}"]
        for sub in ("self_attn", "mlp"):
            for k, v in s[sub].items():
                per_point.setdefault(k, []).append(float(np.mean(v[0])))
    return per_point


def bytes_per_token(config, sparsity: dict[str, list[float]], cache_len: int, method: str):
    """Bytes of weights (and KV cache) one decode step reads with this sparsity."""
    c = config
    item = jnp.dtype(c.dtype).itemsize
    d, m, q, kv = c.hidden_size, c.intermediate_size, c.q_dim, c.kv_dim
    pts = set(kernels_for_method(method, "pallas").points) if method != "dense" else set()
    total = 0.0
    for i in range(c.num_layers):
        def dens(p, i=i):
            return 1.0 - sparsity[p][i] if p in pts else 1.0
        total += d * q * dens("q_in") + 2 * d * kv * dens("kv_in") + q * d * dens("o_in")
        up_rows = dens("gate") if "gate" in pts else dens("ffn_in")
        total += d * m * dens("ffn_in") + d * m * up_rows + m * d * dens("down_in")
    total += c.vocab_size * d  # output projection (the embedding gather is negligible)
    total *= item
    total += c.num_layers * 2 * cache_len * kv * item  # XLA attention reads every slot
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


def bench_method(args, config, params, method, quantiles, prompt, cache_len, bw):
    """Times `args.steps` decode steps of one method; returns its result row."""
    th = thresholds_for(method, quantiles, config)
    kernels = kernels_for_method(method, args.kernels if method != "dense" else "xla")
    p = prepare_params(params, config, kernels)
    # Fill the cache with a real (dense) prefill, then decode.
    model = build_model(config)
    prefill = jax.jit(lambda p_, t_, c_: model.apply(
        {"params": p_}, t_, jnp.arange(t_.shape[1])[None], c_, 0, last_only=True),
        donate_argnums=(2,))
    logits, cache = prefill(params, jnp.asarray(prompt, jnp.int32)[None],
                            init_cache(config, 1, cache_len))
    tok = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
    sp = measured_sparsity(config, params, th, cache, tok, args.prompt_len) if th else {}
    decode = make_decode(config, kernels, args.steps)
    pos = jnp.full((1,), args.prompt_len, jnp.int32)
    index = args.prompt_len
    t0 = time.perf_counter()
    tok, pos, cache = decode(p, tok, pos, cache, index, th)  # compile and warm up
    jax.block_until_ready(tok)
    compile_s = time.perf_counter() - t0
    index += args.steps
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        tok, pos, cache = decode(p, tok, pos, cache, index, th)
        jax.block_until_ready(tok)
        times.append(time.perf_counter() - t0)
        index += args.steps
    tps = args.steps / statistics.median(times)
    nbytes = bytes_per_token(config, sp, cache_len, method)
    return {
        "tokens_per_s": tps,
        "ms_per_token": 1e3 / tps,
        "bytes_per_token": nbytes,
        "roofline_tokens_per_s": bw / nbytes,
        "roofline_fraction": tps / (bw / nbytes),
        "measured_sparsity": {k: float(np.mean(v)) for k, v in sp.items()},
        "kernels": "xla" if method == "dense" else args.kernels,
        "compile_and_warmup_s": compile_s,
        "times_s": times,
    }


def run(args) -> dict:
    if args.model == "llama3-8b":
        config = LLAMA3_8B
        params = random_params(config)
        tokenizer = None
        name = "Llama-3-8B shapes, random bf16 weights"
    else:
        from jaxsparse.loading import load_model

        lm = load_model(None if args.model == "smollm2" else args.model, dtype="bfloat16")
        config, params, tokenizer = lm.config, lm.params, lm.tokenizer
        name = f"SmolLM2-135M-Instruct real weights ({Path(lm.source).name}, bf16)"
    bw = copy_bandwidth()
    prompt = real_text_tokens(tokenizer, config.vocab_size, args.prompt_len)
    quantiles = calibrate_thresholds(config, params, prompt, args.sparsity)
    # Every timed step appends to the cache: room for warm-up and repeats.
    cache_len = args.prompt_len + args.steps * (args.repeats + 2) + 8
    results: dict = {}
    for method in args.methods:
        try:
            results[method] = bench_method(args, config, params, method, quantiles, prompt,
                                           cache_len, bw)
        except Exception as e:  # a method that fails is recorded; the others still run
            if method == "dense":
                raise
            results[method] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            print(f"{method} failed: {results[method]['error'][:800]}", file=sys.stderr)
    dense = results["dense"]["tokens_per_s"]
    for r in results.values():
        if "tokens_per_s" in r:
            r["speedup_vs_dense"] = r["tokens_per_s"] / dense
    return {
        "benchmark": "decode",
        "model": name,
        "device": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "jax_version": jax.__version__,
        "date": datetime.date.today().isoformat(),
        "batch": 1,
        "target_sparsity": args.sparsity,
        "prompt_len": args.prompt_len,
        "steps_per_timed_run": args.steps,
        "repeats": args.repeats,
        "cache_len": cache_len,
        "copy_bandwidth_GBps": bw / 1e9,
        "roofline_tokens_per_s": results["dense"]["roofline_tokens_per_s"],
        "methods": results,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True, help="where to write the results")
    p.add_argument("--model", default="llama3-8b", help="llama3-8b, smollm2, or a model path")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--kernels", default="pallas", choices=("pallas", "xla"))
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    if "dense" not in args.methods:
        args.methods.insert(0, "dense")
    if not 0.0 <= args.sparsity < 1.0:
        p.error(f"--sparsity {args.sparsity}: must be in [0, 1)")
    out = run(args)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        json.dump(out, f, indent=2)
    os.replace(f.name, path)
    print(f"\n{out['model']} on {out['device']}, jax {out['jax_version']}, batch 1, "
          f"S={args.sparsity}, copy {out['copy_bandwidth_GBps']:.0f} GB/s")
    print(f"{'method':8} {'tok/s':>8} {'speedup':>8} {'roofline':>9} {'of roof':>8} "
          f"{'sparsity (thresholded points)'}")
    for m, r in out["methods"].items():
        if "error" in r:
            print(f"{m:8} failed: {r['error'][:200]}")
            continue
        sp = " ".join(f"{k}={v:.2f}" for k, v in r["measured_sparsity"].items()
                      if k in THRESHOLDED[m])
        print(f"{m:8} {r['tokens_per_s']:8.1f} {r['speedup_vs_dense']:8.2f} "
              f"{r['roofline_tokens_per_s']:9.1f} {r['roofline_fraction']:8.2f} {sp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
