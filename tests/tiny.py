"""Tiny random configs and a byte tokenizer shared by the CPU tests of fitting and
evaluation, and the names of the Pallas kernels a jaxpr runs (`pallas_calls`); importable
from any test module in tests/: pytest puts this folder on sys.path."""

import dataclasses

import numpy as np

from jaxsparse.config import ModelConfig

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


def sub_jaxprs(eqn) -> list:
    """The jaxprs nested in one equation's parameters (a jit's body, a cond's branches)."""
    out = []
    for v in eqn.params.values():
        for sub in v if isinstance(v, (list, tuple)) else [v]:
            inner = getattr(sub, "jaxpr", sub)
            if hasattr(inner, "eqns"):
                out.append(inner)
    return out
