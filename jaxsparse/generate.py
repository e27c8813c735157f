"""Text generation: prefill, then token-by-token decode with a KV cache, jit-compiled.

Holds `Generator`, which compiles one prefill per (batch size, prompt-length bucket,
cache length) and one decode step per (batch size, cache length), keeps them, and reuses
them for every later call with the same shapes, the same sampling settings being runtime
data (greedy is temperature 0). Prompts of different lengths are left-padded to a
power-of-two bucket. Sparsity is a thresholds tree passed beside the params: applied to
decode tokens, and to prefill only when asked (prefill is compute-bound).

It does not load models or parse arguments: see `jaxsparse.loading` and `jaxsparse.cli.generate`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse.config import ModelConfig
from jaxsparse.models import Kernels, build_model, init_cache, prepare_params
from jaxsparse.models.layers import XLA

MIN_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy; top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be >= 0 (0 disables it)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1] (1 disables it)")


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per prompt, EOS excluded
    prompt_tokens: list[int]  # prompt length per prompt
    prefill_s: float
    decode_s: float
    compile_s: float
    decode_steps: int
    # Mean zero fraction per sparsification point over the decoded tokens (when measured).
    measured_sparsity: dict[str, float] | None = None
    measured_sparsity_per_layer: dict[str, list[float]] | None = None

    @property
    def prefill_tokens_per_s(self) -> float:
        return sum(self.prompt_tokens) / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        """Decoded tokens per second, summed over the batch (each step makes B tokens)."""
        n = self.decode_steps * len(self.tokens)
        return n / self.decode_s if self.decode_s > 0 else float("nan")


def bucket_length(n: int) -> int:
    """The prompt-length bucket of an `n`-token prompt: the next power of two, at least 16."""
    return max(MIN_BUCKET, 1 << (max(n, 1) - 1).bit_length())


def sample_logits(logits_BxV: jax.Array, key: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """Greedy where temperature == 0, else temperature / top-k / top-p sampling. [B] int32."""
    logits = logits_BxV.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    sorted_desc = -jnp.sort(-scaled, axis=-1)
    vocab = logits.shape[-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(sorted_desc, jnp.broadcast_to(k - 1, (logits.shape[0], 1)), axis=-1)
    scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    # top-p over what top-k kept: drop tokens once the mass before them reaches top_p.
    probs_sorted = jax.nn.softmax(jnp.where(sorted_desc < kth, -jnp.inf, sorted_desc), axis=-1)
    mass_before = jnp.cumsum(probs_sorted, axis=-1) - probs_sorted
    cutoff_idx = jnp.sum(mass_before < top_p, axis=-1, keepdims=True) - 1
    cutoff = jnp.take_along_axis(sorted_desc, cutoff_idx, axis=-1)
    scaled = jnp.where(scaled < cutoff, -jnp.inf, scaled)
    sampled = jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)


def _stats_means(stats: dict, valid_B: jax.Array) -> dict:
    """Per layer and point: mean zero fraction over the valid rows of one decode step."""
    w = valid_B.astype(jnp.float32)
    out = {}
    for layer, tree in stats.items():
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        for path, frac_BxT in flat:
            point = next(str(p.key) for p in reversed(path) if hasattr(p, "key"))
            out[(layer, point)] = jnp.sum(frac_BxT[:, -1] * w) / jnp.maximum(jnp.sum(w), 1)
    return out


class Generator:
    """Compiled prefill and decode for one model; reuse it across calls to reuse compilations."""

    def __init__(self, config: ModelConfig, params: Any, tokenizer: Any = None,
                 kernels: Kernels = XLA):
        """`kernels` picks the decode matmuls (`jaxsparse.models.kernels_for_method`); the
        params are laid out for it here, once."""
        self.config = config
        self.params = prepare_params(params, config, kernels)
        self.tokenizer = tokenizer
        self.kernels = kernels
        self.model = build_model(config, kernels)
        self._compiled: dict[tuple, Any] = {}
        self.eos_ids = set(config.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            self.eos_ids.add(int(tokenizer.eos_token_id))
        self.pad_id = next(
            (x for x in (config.pad_token_id, *sorted(self.eos_ids)) if x is not None), 0)

    # ------------------------------------------------------------------ compiled steps

    def _prefill_fn(self, params, tokens_BxT, positions_BxT, cache, thresholds, key, sampling):
        logits, cache = self.model.apply(
            {"params": params}, tokens_BxT, positions_BxT, cache, 0, thresholds, last_only=True)
        next_B = sample_logits(logits[:, -1], key, *sampling)
        return next_B, cache

    def _decode_fn(self, params, tokens_B, positions_B, cache, index, thresholds, key, sampling,
                   valid_B, collect_stats):
        out = self.model.apply(
            {"params": params}, tokens_B[:, None], positions_B[:, None], cache, index, thresholds,
            last_only=True, mutable=["stats"] if collect_stats else False)
        if collect_stats:
            (logits, cache), variables = out
            stats = _stats_means(variables["stats"], valid_B)
        else:
            logits, cache = out
            stats = {}
        next_B = sample_logits(logits[:, -1], key, *sampling)
        return next_B, cache, stats

    def _get(self, kind: str, args: tuple, static: tuple):
        """AOT-compiles `kind` for these argument shapes once; returns (compiled, compile_s)."""
        shapes = jax.tree.map(lambda a: (a.shape, str(a.dtype)), args)
        sig = (kind, static, str(shapes))
        if sig in self._compiled:
            return self._compiled[sig], 0.0
        t0 = time.perf_counter()
        if kind == "prefill":
            fn = jax.jit(self._prefill_fn, donate_argnums=(3,))
        else:
            fn = jax.jit(self._decode_fn, donate_argnums=(3,), static_argnums=(9,))
        compiled = fn.lower(*args, *static).compile()
        self._compiled[sig] = compiled
        return compiled, time.perf_counter() - t0

    # ------------------------------------------------------------------ public API

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this Generator has no tokenizer: pass token ids instead of text")
        if chat:
            if not getattr(self.tokenizer, "chat_template", None):
                raise ValueError("--chat: this model's tokenizer has no chat template")
            enc = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
            return list(enc["input_ids"] if hasattr(enc, "keys") else enc)
        return list(self.tokenizer(prompt)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int = 32,
        sampling: SamplingParams = SamplingParams(),
        thresholds: Any = None,
        sparse_prefill: bool = False,
        stop_at_eos: bool = True,
        collect_stats: bool | None = None,
    ) -> GenerationResult:
        """Generates up to `max_new_tokens` for each prompt (lists of token ids)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
        if collect_stats is None:
            collect_stats = thresholds is not None
        batch = len(prompts)
        bucket = bucket_length(max(len(p) for p in prompts))
        max_len = bucket + max_new_tokens
        if max_len > self.config.max_position_embeddings and self.config.family == "opt":
            raise ValueError(
                f"prompt bucket {bucket} + max_new_tokens {max_new_tokens} exceeds OPT's "
                f"{self.config.max_position_embeddings} learned positions")
        tokens = np.full((batch, bucket), self.pad_id, np.int32)
        valid = np.zeros((batch, bucket), bool)
        for i, p in enumerate(prompts):
            tokens[i, bucket - len(p):] = p
            valid[i, bucket - len(p):] = True
        positions = np.where(valid, np.cumsum(valid, axis=1) - 1, -1).astype(np.int32)
        lengths = valid.sum(axis=1).astype(np.int32)
        samp = (jnp.float32(sampling.temperature), jnp.int32(sampling.top_k),
                jnp.float32(sampling.top_p))
        key = jax.random.key(sampling.seed)
        cache = init_cache(self.config, batch, max_len)

        key, sub = jax.random.split(key)
        prefill_th = thresholds if sparse_prefill else None
        args = (self.params, jnp.asarray(tokens), jnp.asarray(positions), cache, prefill_th, sub,
                samp)
        prefill, compile_s = self._get("prefill", args, ())
        t0 = time.perf_counter()
        next_B, cache = prefill(*args)
        next_B.block_until_ready()
        prefill_s = time.perf_counter() - t0

        out = np.zeros((batch, max_new_tokens), np.int32)
        done = np.zeros(batch, bool)
        stats_sum: dict = {}
        steps = 0
        decode_s = 0.0
        pos_B = jnp.asarray(lengths)
        decode = None
        for step in range(max_new_tokens):
            tok_host = np.asarray(next_B)
            out[:, step] = tok_host
            if stop_at_eos:
                done |= np.isin(tok_host, list(self.eos_ids))
            if step == max_new_tokens - 1 or (stop_at_eos and done.all()):
                break
            key, sub = jax.random.split(key)
            valid_B = jnp.asarray(~done)
            args = (self.params, next_B, pos_B, cache, jnp.int32(bucket + step), thresholds, sub,
                    samp, valid_B)
            if decode is None:  # one signature for the whole loop
                decode, c_s = self._get("decode", args, (collect_stats,))
                compile_s += c_s
            t0 = time.perf_counter()
            next_B, cache, stats = decode(*args)
            next_B.block_until_ready()
            decode_s += time.perf_counter() - t0
            pos_B = pos_B + 1
            steps += 1
            for k, v in stats.items():
                stats_sum[k] = stats_sum.get(k, 0.0) + float(v)

        new_tokens = []
        for i in range(batch):
            row = out[i].tolist()[: steps + 1]
            if stop_at_eos:
                cut = next((j for j, t in enumerate(row) if t in self.eos_ids), len(row))
                row = row[:cut]
            new_tokens.append(row)
        result = GenerationResult(
            tokens=new_tokens, prompt_tokens=[len(p) for p in prompts], prefill_s=prefill_s,
            decode_s=decode_s, compile_s=compile_s, decode_steps=steps)
        if collect_stats and steps:
            per_layer: dict[str, list[float]] = {}
            for (layer, point), total in sorted(stats_sum.items(),
                                                key=lambda kv: (int(kv[0][0].split("_")[1]),
                                                                kv[0][1])):
                per_layer.setdefault(point, []).append(total / steps)
            result.measured_sparsity_per_layer = per_layer
            result.measured_sparsity = {p: float(np.mean(v)) for p, v in per_layer.items()}
        return result

    def generate(self, prompts: str | Sequence[str], max_new_tokens: int = 32,
                 sampling: SamplingParams = SamplingParams(), chat: bool = False,
                 **kwargs) -> tuple[list[str], GenerationResult]:
        """Text in, text out; `prompts` is one string or a list of them."""
        single = isinstance(prompts, str)
        texts = [prompts] if single else list(prompts)
        ids = [self.encode(t, chat=chat) for t in texts]
        result = self.generate_ids(ids, max_new_tokens, sampling, **kwargs)
        return [self.decode(t) for t in result.tokens], result
