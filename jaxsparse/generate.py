"""Text generation: a compiled prefill, then decoding as one compiled on-device loop.

Holds `Generator`. A call runs two compiled functions: the prefill (which also builds the
KV cache and the loop's state on the device) and a `lax.while_loop` of decode steps that
samples, writes each token into an on-device buffer, stops each row at EOS and the whole
loop when every row is done or `max_new_tokens` is reached, and accumulates the sparsity
statistics. The host hears back once per call, or once per chunk when streaming
(`Generator.stream`). Params are placed on the device once (in `__init__`), the sparsity
state once per call; nothing crosses per token (a per-token host round trip cost more than
the sparsity saves on an 8B model on an H100: docs/design.md, "The decode loop").

Compilations are kept per (batch size, prompt-length bucket, `max_new_tokens`, sampling
mode) and reused; temperature, top-k, top-p and the seed are runtime data, as are the
thresholds (one compile serves every threshold method and sparsity). Prompts of different
lengths are left-padded to a power-of-two bucket. Sparsity applies to decode tokens, and
to the prefill only when asked (prefill is compute-bound).

With `mesh=` (`jaxsparse.sharding`), the params, the sparsity state and the KV cache are
split over the mesh by the logical-axis table: `model` is tensor parallelism (each device
reads its share of the weights per token; the sparse kernels run per device on their slice
of rows), `data` splits the prompts of a batch.

`Generator(command_buffers=True)` compiles the decode loop with XLA's command buffers
(`COMMAND_BUFFERS`: on a CUDA GPU the loop and its kernels, Pallas's included, run as CUDA
graphs). Off by default: on an H200 it did not change the sparse methods' speedups over
dense (benchmarks/results/xla_command_buffer_h200/README.md).

It does not load models or parse arguments: see `jaxsparse.loading` and `jaxsparse.cli.generate`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse.config import ModelConfig
from jaxsparse.models import Kernels, build_model, init_cache, prepare_params
from jaxsparse.models.layers import XLA
from jaxsparse.models.predictor import decode_layout

MIN_BUCKET = 16
# XLA options for the decode loop with `Generator(command_buffers=True)`: on a CUDA GPU,
# every kind of command (fusions, library GEMMs, custom calls such as the Pallas kernels,
# and the while loop and its condition) recorded into CUDA graphs, of any size. The CPU
# compiler ignores them (not tried on a TPU).
COMMAND_BUFFERS = {
    "xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL",
    "xla_gpu_graph_min_graph_size": 1,
}


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

    @property
    def mode(self) -> str:
        """The compiled sampling path: "greedy" (an argmax, no sort), "sample" (no filter)
        or "filtered" (top-k / top-p: one sort of the vocabulary per step)."""
        if self.temperature == 0:
            return "greedy"
        return "filtered" if (self.top_k > 0 or self.top_p < 1.0) else "sample"


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per prompt, EOS excluded
    prompt_tokens: list[int]  # prompt length per prompt
    prefill_s: float
    # Wall time of the decode loop as the caller waits for it: from the first loop dispatch
    # to the last token on the host (streamed chunks and their host reads included;
    # compilation excluded, see `compile_s`).
    decode_s: float
    compile_s: float
    decode_steps: int  # loop iterations (each makes one token per row still generating)
    decode_tokens: int = 0  # tokens made by decode steps, summed over the rows
    host_reads: int = 0  # times the decode loop returned to the host (1 unless streamed)
    # Mean zero fraction per sparsification point over every decoded token (when measured),
    # at the points the method sparsifies (down_in too where the gate is sparsified).
    measured_sparsity: dict[str, float] | None = None
    measured_sparsity_per_layer: dict[str, list[float]] | None = None

    @property
    def prefill_tokens_per_s(self) -> float:
        return sum(self.prompt_tokens) / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        """Decoded tokens per second, summed over the batch (rows that stopped at EOS no
        longer count)."""
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")

    @property
    def decode_steps_per_s(self) -> float:
        """Decode steps per second: the tokens per second of one sequence."""
        return self.decode_steps / self.decode_s if self.decode_s > 0 else float("nan")


@dataclasses.dataclass
class StreamChunk:
    """One chunk of `Generator.stream`: the text and token ids each prompt gained since the
    previous chunk; `result` is set on the last chunk only."""

    texts: list[str]
    token_ids: list[list[int]]
    result: GenerationResult | None = None


# Decode steps per streamed chunk. Each chunk is one more call of the compiled loop and a
# host read: on an H200 (Llama-3-8B shapes, benchmarks/results/
# decode_llama3_8b_h200_batches.json) 32 tokens cost 1.6-3.8% of the unbroken loop's
# throughput, 16 tokens up to 9%.
STREAM_CHUNK = 32


def bucket_length(n: int) -> int:
    """The prompt-length bucket of an `n`-token prompt: the next power of two, at least 16."""
    return max(MIN_BUCKET, 1 << (max(n, 1) - 1).bit_length())


def sample_logits(
    logits_BxV: jax.Array, key: jax.Array, temperature, top_k, top_p, mode: str | None = None
) -> jax.Array:
    """Greedy where temperature == 0, else temperature / top-k / top-p sampling. [B] int32.

    `mode` ("greedy", "sample", "filtered": `SamplingParams.mode`) picks the computation
    statically; None decides from the values at run time (computing every branch)."""
    logits = logits_BxV.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if mode == "greedy":
        return greedy
    scaled = logits / jnp.maximum(temperature, 1e-6)
    if mode != "sample":
        sorted_desc = -jnp.sort(-scaled, axis=-1)
        vocab = logits.shape[-1]
        k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
        kth = jnp.take_along_axis(
            sorted_desc, jnp.broadcast_to(k - 1, (logits.shape[0], 1)), axis=-1
        )
        scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
        # top-p over what top-k kept: drop tokens once the mass before them reaches top_p.
        probs_sorted = jax.nn.softmax(jnp.where(sorted_desc < kth, -jnp.inf, sorted_desc), axis=-1)
        mass_before = jnp.cumsum(probs_sorted, axis=-1) - probs_sorted
        cutoff_idx = jnp.sum(mass_before < top_p, axis=-1, keepdims=True) - 1
        cutoff = jnp.take_along_axis(sorted_desc, cutoff_idx, axis=-1)
        scaled = jnp.where(scaled < cutoff, -jnp.inf, scaled)
    sampled = jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
    return sampled if mode is not None else jnp.where(temperature > 0, sampled, greedy)


def default_kernels(
    method: str,
    batch: int,
    mode: str = "auto",
    thresholds: Any = None,
    sparsity: float | None = None,
) -> Kernels:
    """The decode matmuls for a state of `method` at `batch` rows: `mode` "pallas" (the
    sparse kernels) or "xla" (masked dense), or "auto": the kernels on a GPU or TPU for a
    single row; from batch 2 on, the kernels on a GPU where the rows' expected union of
    active rows is small (`BATCH_UNION_MAX`, from the state's target `sparsity`) and every
    kernel point of the method reads lists of active rows (teal, wina, teal-learned), XLA
    otherwise (on an H200 the batch kernels are slower than XLA's dense matmul where the
    union is large: benchmarks/results/kernels_h200.json and compacted_rows_h200/; on a
    CPU they would only run as their pure-jnp references). Dense always runs plain XLA.
    `thresholds`, the state's `thresholds_for_model()`: q/k/v are fused only where its q_in and kv_in thresholds are
    equal (`jaxsparse.registry.kernels_for_method`); None decides by the method's name.
    `sparsity`, the state's target sparsity: from
    `jaxsparse.registry.COMPACT_FROM_SPARSITY` on, the GPU matvecs read lists of active
    rows (`Kernels.compact_points`)."""
    from jaxsparse.registry import kernels_for_method

    if mode not in ("auto", "pallas", "xla"):
        raise ValueError(f"kernels={mode!r}: use 'auto', 'pallas' or 'xla'")
    if method == "dense":
        return kernels_for_method("dense", "xla")
    if mode == "auto":
        accelerator = jax.default_backend() in ("gpu", "tpu")
        if accelerator and batch == 1:
            mode = "pallas"
        elif _batch_kernels_pay(batch, sparsity):
            kernels = kernels_for_method(method, "pallas", thresholds=thresholds, sparsity=sparsity)
            # only where every kernel point reads lists: from batch 2 the masked kernels
            # (a dense input's matvec, CHESS's gated up projection) were slower than XLA
            if set(kernels.points) <= set(kernels.compact_points) and not kernels.dense_points:
                return kernels
            mode = "xla"
        else:
            mode = "xla"
    return kernels_for_method(method, mode, thresholds=thresholds, sparsity=sparsity)


# From batch 2 on, the kernels (lists of the rows' active rows, the batch on the tensor
# cores: `pallas_kernels.compacted_matvec`) beat XLA's dense matmuls only where the union
# of the rows' active rows is small. With independent rows at target sparsity S it is
# 1 - S**B of the rows. On an H200 (benchmarks/results/compacted_rows_h200/) teal at S=0.9
# decoded 1.44x dense at batch 4 (union 0.34) and 1.07x at batch 8 (0.57); at batch 4 and
# S=0.7 (0.76) the kernels alone were 0.83-0.84x XLA's matvec.
BATCH_UNION_MAX = 0.6


def _batch_kernels_pay(batch: int, sparsity: float | None) -> bool:
    """Whether a GPU decode step of `batch` rows at target sparsity `sparsity` may run the
    kernels (`default_kernels`): where the expected union of active rows is at most
    `BATCH_UNION_MAX`. `default_kernels` then also needs every kernel point to read
    lists, which below `registry.COMPACT_FROM_SPARSITY` none does."""
    if sparsity is None or jax.default_backend() != "gpu":
        return False
    return 1.0 - float(sparsity) ** batch <= BATCH_UNION_MAX


def _layer_index(name: str) -> int:
    return int(name.rsplit("_", 1)[1])


def _stats_key(point: str, width: int, layers: list[int], num_layers: int) -> str:
    """The loop's key for one point's stacked counts: the point's name and the width of
    its input, and the layers it covers where that is not every layer."""
    key = f"{point}:{width}"
    if layers == list(range(num_layers)):
        return key
    return f"{key}@{','.join(map(str, layers))}"


def _stats_layers(key: str, num_layers: int) -> tuple[str, int, list[int]]:
    """The inverse of `_stats_key`: the point, its width and the layers of its counts."""
    point_width, _, layers = key.partition("@")
    point, _, width = point_width.rpartition(":")
    covered = [int(i) for i in layers.split(",")] if layers else list(range(num_layers))
    return point, int(width), covered


# The channels of one count: each point's [B, width] zero mask is summed over runs of this
# many channels (fewer where the width, or its share on one device, is not a multiple).
COUNT_RUN = 128


def _count_run(width: int, groups: int) -> int:
    """The run of channels summed into one count: a divisor of `width // groups` (the
    channels on one device when the width is split `groups` ways), so no run spans two
    devices and each counts its own with no exchange."""
    share = width // groups if width % groups == 0 else width
    return math.gcd(share, COUNT_RUN)


def _zero_counts(
    zeros: dict, active_B: jax.Array, num_layers: int, groups: int = 1
) -> dict[str, jax.Array]:
    """Per point: int32 [layers, B, width / run], this step's zeros of the rows still
    generating (`active_B`), every layer's stacked in one array (`_stats_key`), summed
    over runs of channels (`_count_run`). The loop adds them up and the host sums them
    once, at the end. One op per point: a reduction per point and layer would be a launch
    each (~8% of an 8B decode step on an H100:
    benchmarks/results/decode_llama3_8b_h100_per_point_reductions.json), and so was an
    add per point and layer where XLA did not fuse it into the op making the activation
    (~100 more kernels per step at batch 4 on an H200: benchmarks/NOTES_kernels.md). The
    runs keep the carried counts small: a count per channel was 7 MB per point for
    Llama-3-8B's down_proj input at batch 4, read and written every step. A count
    reaches at most `run` per step, so int32 holds 2^31 / 128 steps."""
    per_point: dict[str, dict[int, jax.Array]] = {}
    for layer, tree in zeros.items():
        for path, zero_BxTxW in jax.tree_util.tree_flatten_with_path(tree)[0]:
            point = next(str(p.key) for p in reversed(path) if hasattr(p, "key"))
            z = zero_BxTxW[:, -1] & active_B[:, None]
            per_point.setdefault(point, {})[_layer_index(layer)] = z
    out: dict[str, jax.Array] = {}
    for point, by_layer in per_point.items():
        layers = sorted(by_layer)
        for shape in sorted({by_layer[i].shape for i in layers}):  # one array per width
            same = [i for i in layers if by_layer[i].shape == shape]
            B, W = shape
            run = _count_run(W, groups)
            stacked = jnp.stack([by_layer[i] for i in same]).astype(jnp.int32)
            out[_stats_key(point, W, same, num_layers)] = jnp.sum(
                stacked.reshape(len(same), B, W // run, run), axis=-1
            )
    return out


class Generator:
    """Compiled prefill and decode loop for one model; reuse it across calls to reuse
    compilations."""

    def __init__(
        self,
        config: ModelConfig,
        params: Any,
        tokenizer: Any = None,
        kernels: Kernels = XLA,
        mesh: Any = None,
        command_buffers: bool = False,
    ):
        """`kernels` picks the decode matmuls (`jaxsparse.registry.kernels_for_method`); the
        params are laid out for it and placed on the device here, once. `mesh`: a
        `jax.sharding.Mesh` or a spec such as `"model=2"` (`jaxsparse.sharding.parse_mesh`)
        to spread them over; None: the default device. `command_buffers`: compile the
        decode loop with `COMMAND_BUFFERS` (CUDA graphs on a GPU)."""
        from jaxsparse import sharding
        from jaxsparse.models import logical_axes

        self.config = config
        self.mesh = None if mesh is None else sharding.as_mesh(mesh)
        # the zero counts' runs of channels stay within one device's share (`_count_run`)
        self._count_groups = sharding.model_parallel_size(self.mesh)
        self._replicated = None if self.mesh is None else sharding.replicated(self.mesh)
        if self.mesh is not None and (kernels.mode == "pallas" or kernels.decode_attention):
            # kernels per shard (in an XLA step: the decode attention kernel)
            kernels = dataclasses.replace(kernels, mesh=self.mesh)
        prepared = prepare_params(params, config, kernels)
        if self.mesh is None:
            self.params = jax.device_put(prepared)
        else:
            self.params = sharding.shard_params(prepared, logical_axes(config, kernels), self.mesh)
        self.tokenizer = tokenizer
        self.kernels = kernels
        self.command_buffers = bool(command_buffers)
        self.model = build_model(config, kernels)
        self._compiled: dict[tuple, Any] = {}
        self.eos_ids = set(config.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            self.eos_ids.add(int(tokenizer.eos_token_id))
        self.pad_id = next(
            (x for x in (config.pad_token_id, *sorted(self.eos_ids)) if x is not None), 0
        )

    # ------------------------------------------------------------------ compiled functions

    def _apply(
        self, params, tokens_BxT, positions_BxT, cache, index, thresholds, collect_stats: bool
    ):
        out = self.model.apply(
            {"params": params},
            tokens_BxT,
            positions_BxT,
            cache,
            index,
            thresholds,
            last_only=True,
            mutable=["zeros"] if collect_stats else False,
        )
        if collect_stats:
            (logits, cache), variables = out
            return logits[:, -1], cache, variables.get("zeros", {})  # none: nothing sparsified
        logits, cache = out
        return logits[:, -1], cache, None

    def _put(self, x):
        """Onto the device, or replicated over the mesh."""
        return jax.device_put(x, self._replicated)

    def _put_thresholds(self, thresholds):
        from jaxsparse.sparsity import drop_zero_points, shares_qkv_input

        if thresholds is not None:
            with jax.transfer_guard("allow"):  # host-side checks, once per call
                thresholds = jax.device_get(thresholds)
        if thresholds is not None and self.kernels.fuse_qkv and not shares_qkv_input(thresholds):
            raise ValueError(
                "these thresholds give q_in and kv_in different values, but this "
                "Generator's kernels fuse q/k/v into one matmul on the q input, which "
                "would apply q_in's threshold to k/v too: build the Generator with "
                "kernels=default_kernels(method, batch, mode, thresholds=...) (or "
                "jaxsparse.registry.kernels_for_method(..., thresholds=...))"
            )
        thresholds = drop_zero_points(thresholds)  # a select less where one keeps all
        if thresholds is None or self.mesh is None:
            return None if thresholds is None else jax.device_put(thresholds)
        from jaxsparse import sharding
        from jaxsparse.models import state_logical_axes

        return sharding.shard_tree(thresholds, state_logical_axes(thresholds), self.mesh)

    def _constrain(self, carry: dict) -> dict:
        """With a mesh: the loop state laid out the same way after the prefill and after
        every loop call, so that one compiled loop takes what either returns: the KV cache
        by the logical-axis table, the zero counts as the activations they count (a
        device counts its own channels, no exchange per step), the rest replicated."""
        if self.mesh is None:
            return carry
        from jax.sharding import PartitionSpec as P

        from jaxsparse import sharding
        from jaxsparse.models import cache_logical_axes
        from jaxsparse.rules import POINT_AXES

        shard = {
            k: jax.tree.map(lambda _: self._replicated, v)
            for k, v in carry.items()
            if k not in ("cache", "stats")
        }
        shard["cache"] = sharding.tree_shardings(
            cache_logical_axes(self.config), carry["cache"], self.mesh
        )
        if "stats" in carry:
            axes = {  # [layers, B, width / run]; gate_rows: mlp
                key: P(None, "batch", POINT_AXES.get(_stats_layers(key, 0)[0], "mlp"))
                for key in carry["stats"]
            }
            shard["stats"] = sharding.tree_shardings(axes, carry["stats"], self.mesh)
        return jax.lax.with_sharding_constraint(carry, shard)

    def _eos_hit(self, tok_B):
        eos = jnp.asarray(sorted(self.eos_ids) or [-1], jnp.int32)
        return jnp.any(tok_B[:, None] == eos[None, :], axis=-1)

    def _prefill_fn(
        self,
        params,
        tokens_BxT,
        positions_BxT,
        prefill_thresholds,
        thresholds,
        sampling,
        seed,
        max_new_tokens: int,
        mode: str,
        collect_stats: bool,
        stop_at_eos: bool,
    ) -> dict:
        """Prefill, first token, and the decode loop's initial state (the carry)."""
        batch, bucket = tokens_BxT.shape
        cache = init_cache(self.config, batch, bucket + max_new_tokens)
        key, sub = jax.random.split(jax.random.key(seed))
        logits_BxV, cache, _ = self._apply(
            params, tokens_BxT, positions_BxT, cache, 0, prefill_thresholds, False
        )
        tok_B = sample_logits(logits_BxV, sub, *sampling, mode=mode)
        carry = {
            "out": jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(tok_B),
            "tok": tok_B,
            "pos": jnp.max(positions_BxT, axis=1) + 1,
            "cache": cache,
            "index": jnp.int32(bucket),
            "step": jnp.int32(1),
            "done": self._eos_hit(tok_B) if stop_at_eos else jnp.zeros((batch,), bool),
            "key": key,
            "decoded": jnp.int32(0),
        }
        if collect_stats:  # zeros shaped like one step's statistics
            step = jax.eval_shape(
                lambda: _zero_counts(
                    self._apply(
                        params,
                        tok_B[:, None],
                        carry["pos"][:, None],
                        cache,
                        carry["index"],
                        thresholds,
                        True,
                    )[2],
                    jnp.ones((batch,), bool),
                    self.config.num_layers,
                    self._count_groups,
                )
            )
            carry["stats"] = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), step)
        return self._constrain(carry)

    def _loop_fn(
        self,
        params,
        thresholds,
        sampling,
        carry,
        stop_step,
        mode: str,
        collect_stats: bool,
        stop_at_eos: bool,
    ) -> dict:
        """Decode steps on the device until `stop_step` tokens per row (or every row done)."""
        thresholds = decode_layout(thresholds)  # once per call, outside the loop

        def cond(c):
            go = c["step"] < stop_step
            return go & ~jnp.all(c["done"]) if stop_at_eos else go

        def body(c):
            key, sub = jax.random.split(c["key"])
            active_B = ~c["done"]
            logits_BxV, cache, stats = self._apply(
                params,
                c["tok"][:, None],
                c["pos"][:, None],
                c["cache"],
                c["index"],
                thresholds,
                collect_stats,
            )
            tok_B = sample_logits(logits_BxV, sub, *sampling, mode=mode)
            new = {
                "out": jax.lax.dynamic_update_slice_in_dim(
                    c["out"], tok_B[:, None], c["step"], axis=1
                ),
                "tok": tok_B,
                "pos": c["pos"] + 1,
                "cache": cache,
                "index": c["index"] + 1,
                "step": c["step"] + 1,
                "done": c["done"] | self._eos_hit(tok_B) if stop_at_eos else c["done"],
                "key": key,
                "decoded": c["decoded"] + jnp.sum(active_B.astype(jnp.int32)),
            }
            if collect_stats:
                new["stats"] = jax.tree.map(
                    jnp.add,
                    c["stats"],
                    _zero_counts(stats, active_B, self.config.num_layers, self._count_groups),
                )
            return new

        return self._constrain(jax.lax.while_loop(cond, body, carry))

    def _get(self, kind: str, args: tuple, static: tuple):
        """AOT-compiles `kind` for these argument shapes once; returns (compiled, compile_s)."""
        shapes = jax.tree.map(lambda a: (a.shape, str(a.dtype)), args)
        sig = (kind, static, str(shapes))
        if sig in self._compiled:
            return self._compiled[sig], 0.0
        t0 = time.perf_counter()
        if kind == "prefill":
            fn = jax.jit(self._prefill_fn, static_argnums=(7, 8, 9, 10))
        else:  # the carry (KV cache included) is donated: updated in place
            fn = jax.jit(self._loop_fn, donate_argnums=(3,), static_argnums=(5, 6, 7))
        options = COMMAND_BUFFERS if kind != "prefill" and self.command_buffers else None
        compiled = fn.lower(*args, *static).compile(compiler_options=options)
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
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
            )
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
        """Generates up to `max_new_tokens` for each prompt (lists of token ids) in one
        unbroken on-device loop. `collect_stats` (default: with `thresholds`) measures the
        zero fraction of every sparsification point over every decoded token."""
        steps = self.stream_ids(
            prompts,
            max_new_tokens,
            sampling,
            thresholds,
            sparse_prefill,
            stop_at_eos,
            collect_stats,
            chunk_tokens=None,
        )
        for _, result in steps:
            if result is not None:
                return result
        raise AssertionError("stream_ids ended without a result")  # pragma: no cover

    def stream_ids(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int = 32,
        sampling: SamplingParams = SamplingParams(),
        thresholds: Any = None,
        sparse_prefill: bool = False,
        stop_at_eos: bool = True,
        collect_stats: bool | None = None,
        chunk_tokens: int | None = STREAM_CHUNK,
    ) -> Iterator[tuple[list[list[int]], GenerationResult | None]]:
        """Like `generate_ids`, yielding `(new token ids per prompt, None)` every
        `chunk_tokens` decode steps (one host read each; None: one unbroken loop), and
        `([], result)` last. The ids may include EOS and what follows it in a row that
        stopped; `result.tokens` is cut at the first EOS."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
        if chunk_tokens is not None and chunk_tokens < 1:
            raise ValueError(f"chunk_tokens={chunk_tokens}: must be >= 1 (None: no chunks)")
        if collect_stats is None:
            collect_stats = thresholds is not None
        batch = len(prompts)
        bucket = bucket_length(max(len(p) for p in prompts))
        if bucket + max_new_tokens > self.config.max_position_embeddings and (
            self.config.family == "opt"
        ):
            raise ValueError(
                f"prompt bucket {bucket} + max_new_tokens {max_new_tokens} exceeds OPT's "
                f"{self.config.max_position_embeddings} learned positions"
            )
        tokens = np.full((batch, bucket), self.pad_id, np.int32)
        valid = np.zeros((batch, bucket), bool)
        for i, p in enumerate(prompts):
            tokens[i, bucket - len(p) :] = p
            valid[i, bucket - len(p) :] = True
        positions = np.where(valid, np.cumsum(valid, axis=1) - 1, -1).astype(np.int32)
        samp = self._put(
            (np.float32(sampling.temperature), np.int32(sampling.top_k), np.float32(sampling.top_p))
        )
        # The sparsity state goes to the device once per call, not once per token.
        thresholds = self._put_thresholds(thresholds)
        static = (sampling.mode, bool(collect_stats), bool(stop_at_eos))

        args = (
            self.params,
            *self._put((tokens, positions)),
            thresholds if sparse_prefill else None,
            thresholds,
            samp,
            self._put(np.uint32(sampling.seed)),
        )
        prefill, compile_s = self._get("prefill", args, (max_new_tokens, *static))
        t0 = time.perf_counter()
        carry = prefill(*args)
        first = jax.device_get(carry["tok"])
        prefill_s = time.perf_counter() - t0

        yield [[int(t)] for t in first], None
        seen = 1
        host_reads = 0
        decode_s = 0.0
        chunk = max_new_tokens if chunk_tokens is None else chunk_tokens
        stop_early = stop_at_eos and all(int(t) in self.eos_ids for t in first)
        if not stop_early and max_new_tokens > 1:  # compiled before the clock starts
            loop, c_s = self._get(
                "loop", (self.params, thresholds, samp, carry, self._put(np.int32(0))), static
            )
            if c_s:  # a new executable's first run loads its GPU modules: zero steps here
                t1 = time.perf_counter()
                carry = loop(self.params, thresholds, samp, carry, self._put(np.int32(1)))
                jax.block_until_ready(carry["step"])
                c_s += time.perf_counter() - t1
            compile_s += c_s
        t0 = time.perf_counter()
        while seen < max_new_tokens and not stop_early:
            stop = self._put(np.int32(min(seen + chunk, max_new_tokens)))
            carry = loop(self.params, thresholds, samp, carry, stop)
            out, step, done = jax.device_get((carry["out"], carry["step"], carry["done"]))
            host_reads += 1
            step = int(step)
            new = out[:, seen:step]
            seen = step
            stop_early = stop_at_eos and bool(done.all())
            if chunk_tokens is not None and new.size:
                yield new.tolist(), None
        decode_s = time.perf_counter() - t0 if host_reads else 0.0
        if host_reads:
            out, decoded = jax.device_get((carry["out"], carry["decoded"]))
        else:
            out, decoded = jax.device_get(carry["out"]), 0
        new_tokens = []
        for i in range(batch):
            row = out[i, :seen].tolist()
            if stop_at_eos:
                cut = next((j for j, t in enumerate(row) if t in self.eos_ids), len(row))
                row = row[:cut]
            new_tokens.append(row)
        result = GenerationResult(
            tokens=new_tokens,
            prompt_tokens=[len(p) for p in prompts],
            prefill_s=prefill_s,
            decode_s=decode_s,
            compile_s=compile_s,
            decode_steps=seen - 1,
            decode_tokens=int(decoded),
            host_reads=host_reads,
        )
        if collect_stats and host_reads and int(decoded):
            totals = jax.device_get(carry["stats"])  # the one read of the statistics
            by_layer: dict[str, dict[int, float]] = {}
            for key, counts_LxBxR in totals.items():
                point, width, layers = _stats_layers(key, self.config.num_layers)
                for i, counts in zip(layers, counts_LxBxR):
                    by_layer.setdefault(point, {})[i] = float(np.sum(counts, dtype=np.int64)) / (
                        int(decoded) * width
                    )
            per_layer = {p: [v[i] for i in sorted(v)] for p, v in by_layer.items()}
            result.measured_sparsity_per_layer = per_layer
            result.measured_sparsity = {p: float(np.mean(v)) for p, v in per_layer.items()}
        yield [], result

    def generate(
        self,
        prompts: str | Sequence[str],
        max_new_tokens: int = 32,
        sampling: SamplingParams = SamplingParams(),
        chat: bool = False,
        **kwargs,
    ) -> tuple[list[str], GenerationResult]:
        """Text in, text out; `prompts` is one string or a list of them."""
        single = isinstance(prompts, str)
        texts = [prompts] if single else list(prompts)
        ids = [self.encode(t, chat=chat) for t in texts]
        result = self.generate_ids(ids, max_new_tokens, sampling, **kwargs)
        return [self.decode(t) for t in result.tokens], result

    def stream(
        self,
        prompts: str | Sequence[str],
        max_new_tokens: int = 32,
        sampling: SamplingParams = SamplingParams(),
        chat: bool = False,
        chunk_tokens: int = STREAM_CHUNK,
        **kwargs,
    ) -> Iterator[StreamChunk]:
        """Text as it is generated: yields a `StreamChunk` every `chunk_tokens` decode steps
        (the loop returns to the host only then), the last one carrying the result.

            for chunk in gen.stream("Hello", max_new_tokens=64):
                print(chunk.texts[0], end="", flush=True)
        """
        single = isinstance(prompts, str)
        texts = [prompts] if single else list(prompts)
        ids = [self.encode(t, chat=chat) for t in texts]
        rows: list[list[int]] = [[] for _ in ids]
        shown = [""] * len(ids)
        ended = [False] * len(ids)  # the row has produced its EOS
        stop_at_eos = kwargs.get("stop_at_eos", True)
        for new, result in self.stream_ids(
            ids, max_new_tokens, sampling, chunk_tokens=chunk_tokens, **kwargs
        ):
            got_text, got_ids = [], []
            for i in range(len(ids)):
                kept = []
                for t in new[i] if new else []:
                    ended[i] = ended[i] or (stop_at_eos and t in self.eos_ids)
                    if ended[i]:
                        break
                    kept.append(t)
                rows[i] = list(result.tokens[i]) if result is not None else rows[i] + kept
                text = self.decode(rows[i])
                # Hold back an incomplete UTF-8 sequence until its next token arrives.
                stable = text if result is not None else text.rstrip("\ufffd")
                if stable.startswith(shown[i]):
                    got_text.append(stable[len(shown[i]) :])
                    shown[i] = stable
                else:  # the tokenizer re-segmented shown text: nothing safe to add
                    got_text.append("")
                got_ids.append(kept)
            yield StreamChunk(got_text, got_ids, result)
