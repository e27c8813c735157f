"""Tiny random configs and a byte tokenizer shared by the CPU tests of fitting and
evaluation, random thresholds for every point (`random_thresholds`), the GPU kernels'
implementation under test (`GPU_IMPL`), prefill-and-greedy-decode logits
(`decode_logits`), a runner of a test
module's cases on fake CPU devices (`fake_devices_report`), and the names of the Pallas
kernels a jaxpr runs (`pallas_calls`); importable from any test module in tests/: pytest
puts this folder on sys.path."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from jaxsparse.config import ModelConfig


def env_impls() -> list[str]:
    """The kernel implementations PALLAS_KERNELS_TEST_IMPLS names (comma-separated; none
    when unset), e.g. "gpu" on a CUDA machine (tests/pallas_kernels/conftest.py)."""
    env = os.environ.get("PALLAS_KERNELS_TEST_IMPLS", "")
    return [i.strip() for i in env.split(",") if i.strip()]


# The GPU kernels that decode-parity tests run: their interpreter, on any backend, unless
# PALLAS_KERNELS_TEST_IMPLS names "gpu": then the compiled kernels.
GPU_IMPL = "gpu" if "gpu" in env_impls() else "gpu_interpret"

LLAMA = ModelConfig(
    model_type="llama",
    vocab_size=260,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    eos_token_ids=(0,),
)
OPT = ModelConfig(
    model_type="opt",
    vocab_size=260,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=4,
    head_dim=8,
    eos_token_ids=(0,),
    qkv_bias=True,
    o_bias=True,
    mlp_bias=True,
    tie_word_embeddings=True,
    position_offset=2,
    max_position_embeddings=128,
)


class ByteTok:
    eos_token_id = 0

    def encode(self, text, add_special_tokens=False):
        return [b + 1 for b in text.encode()]


# ------------------------------------------------------------------ text and sweeps

WORDS = ("alpha", "beta", "gamma", "delta", "sparse", "token", "layer", "the", "of", "a")
SWEEP_WORDS = WORDS[:-1]  # the sweep tests' vocabulary


def write_words(rng, path, n: int, words=WORDS):
    """Writes `n` words drawn by `rng` (numpy Generator) from `words` to `path`."""
    path.write_text(" ".join(rng.choice(list(words), n)))
    return path


@dataclasses.dataclass
class Loaded:
    """A loaded model as sweeps take it (the fields of `jaxsparse.loading.LoadedModel`)."""

    config: ModelConfig
    params: dict
    tokenizer: object
    source: str = "tiny-random"


def sweep_corpus(tmp_path, cal_words: int, seed: int = 0):
    """`(rng, cal.txt, ev.txt)`: calibration and evaluation text of the sweep tests."""
    rng = np.random.default_rng(seed)
    cal = write_words(rng, tmp_path / "cal.txt", cal_words, SWEEP_WORDS)
    ev = write_words(rng, tmp_path / "ev.txt", 200, SWEEP_WORDS)
    return rng, cal, ev


def sweep_kwargs(cal, ev, tokens: int, tasks=None, **extra) -> dict:
    """The keyword arguments of `sweep` / `sweep_fractions` on that text (sequences of 64,
    batches of 8, every perplexity token)."""
    return {
        "data": [str(cal)],
        "calib": {"tokens": tokens, "seq_len": 64, "batch_size": 8},
        "ev": {"seq_len": 64, "batch_size": 8, "ppl": [str(ev)], "tasks": tasks, "max_tokens": 0},
        "progress": False,
        **extra,
    }


def block_jaxprs(jaxpr) -> list:
    """The jaxprs of the decoder blocks that a model's `jaxpr` runs, in layer order: each
    block is one call of the jitted `jaxsparse.models.llama._apply_block`."""
    return [
        e.params["jaxpr"].jaxpr
        for e in jaxpr.eqns
        if e.primitive.name in ("jit", "pjit") and e.params.get("name") == "_apply_block"
    ]


def pallas_calls(jaxpr) -> list:
    """The names of the pallas_calls in `jaxpr` and its sub-jaxprs, in order."""
    return [name for e in jaxpr.eqns for name in pallas_calls_of(e)]


def pallas_calls_of(eqn) -> list:
    """The names of the pallas_calls one equation runs: itself, or inside its sub-jaxprs."""
    if eqn.primitive.name == "pallas_call":
        return [str(eqn.params.get("name"))]
    return [name for inner in sub_jaxprs(eqn) for name in pallas_calls(inner)]


def ops_outside_kernels(jaxpr) -> list[tuple[str, tuple]]:
    """(primitive name, first output's shape) of each equation of `jaxpr` and its
    sub-jaxprs, pallas_calls' bodies left out: what XLA runs around the kernels."""
    out = []
    for e in jaxpr.eqns:
        out.append((e.primitive.name, tuple(getattr(e.outvars[0].aval, "shape", ()))))
        if e.primitive.name != "pallas_call":
            for inner in sub_jaxprs(e):
                out += ops_outside_kernels(inner)
    return out


def sub_jaxprs(eqn) -> list:
    """The jaxprs nested in one equation's parameters (a jit's body, a cond's branches)."""
    out = []
    for v in eqn.params.values():
        for sub in v if isinstance(v, (list, tuple)) else [v]:
            inner = getattr(sub, "jaxpr", sub)
            if hasattr(inner, "eqns"):
                out.append(inner)
    return out


# ------------------------------------------------------------------ thresholds, devices


def decode_logits(config, params, kernels, thresholds, prompt_BxT, steps: int, zeros=False):
    """Prefill (`thresholds`=None: dense), then `steps` greedy decode steps through
    `kernels` with `thresholds`: the logits [steps, B, V] in float32. With `zeros`, also
    every step's zero masks of the sparsified points, flattened into one bool vector."""
    import jax
    import jax.numpy as jnp

    from jaxsparse.models import build_model, init_cache, prepare_params

    model, p = build_model(config, kernels), prepare_params(params, config, kernels)
    run = jax.jit(lambda p, *a: model.apply({"params": p}, *a))  # prefill, and steps
    sown_run = jax.jit(lambda p, *a: model.apply({"params": p}, *a, mutable=["zeros"]))
    b, t = prompt_BxT.shape
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    logits, cache = run(p, prompt_BxT, pos, init_cache(config, b, t + steps), 0, None)
    out, masks = [], []
    for i in range(steps):
        tok = jnp.argmax(logits[:, -1], -1)[:, None]
        args = (tok, jnp.full((b, 1), t + i), cache, t + i, thresholds)
        if zeros:
            (logits, cache), sown = sown_run(p, *args)
            masks += [np.asarray(z).ravel() for z in jax.tree.leaves(sown.get("zeros", {}))]
        else:
            logits, cache = run(p, *args)
        out.append(np.asarray(logits[:, -1], np.float32))
    if not zeros:
        return np.stack(out)
    return np.stack(out), np.concatenate(masks) if masks else np.zeros(0, bool)


def random_thresholds(config, key, scale=0.02):
    """A threshold per channel at every point (`jaxsparse.rules.TENSORS`) of every layer,
    uniform in [0, scale)."""
    import jax

    from jaxsparse.rules import TENSORS, tensor_width

    out = {}
    for i in range(config.num_layers):
        key, *ks = jax.random.split(key, len(TENSORS) + 1)
        out[f"layers_{i}"] = {
            n: scale
            * jax.random.uniform(
                k, (tensor_width(n, config.hidden_size, config.q_dim, config.intermediate_size),)
            )
            for n, k in zip(TENSORS, ks)
        }
    return out


def fake_devices_report(module: str, devices: int, flags: str = "", timeout: int = 900) -> dict:
    """Run the test module at path `module` as a script on `devices` fake CPU devices
    (`--xla_force_host_platform_device_count`, which must be set before jax starts, hence
    the subprocess) and return the JSON its last line of output prints."""
    xla_flags = f"--xla_force_host_platform_device_count={devices} {flags}".strip()
    env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu")
    p = subprocess.run(
        [sys.executable, str(Path(module).resolve())],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(p.stdout.strip().splitlines()[-1])
