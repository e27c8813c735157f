"""Building blocks shared by the model families: linear, norms, RoPE, attention, KV cache.

Params carry logical axis names (`nn.with_logical_partitioning`), mapped to mesh axes by
`jaxsparse.sharding`. Kernels are stored `[in, out]` (`y = x @ kernel`), so the row of an
input channel is contiguous: the layout the sparse-input kernels read.

The KV cache is explicit data, not a Flax collection: a dict with `pos` [B, S] (the
position held by each slot, -1 for empty or padding) and one `{"k", "v"}` [B, Hkv, S, Dh]
entry per layer. One write index is shared by the batch (prompts are left-padded). The
kv-head axis sits next to the batch axis so that a decode step's attention is a batched
matmul over (batch, kv head): with `[B, S, Hkv, Dh]` XLA on GPU lowered it as a
materialized broadcast-multiply and two reductions, ~15% of a Llama-3-8B decode step
(profiled on an H100: benchmarks/profile_decode.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse import rules
from jaxsparse.config import FULL, ModelConfig, rope_inv_freq

MASK_VALUE = -1e30  # finite, so a row with nothing to attend (padding) gives no NaN


def param_dtype(config: ModelConfig):
    return jnp.dtype(config.dtype)


# `Kernels(attention_splits=None)`: slots per range of the decode attention kernel (its
# slot block) and the most ranges.
ATTENTION_SLOTS_PER_SPLIT = 64
ATTENTION_MAX_SPLITS = 16


@dataclasses.dataclass(frozen=True)
class Kernels:
    """How decode-step matmuls run: "xla" (masked dense: the reference) or "pallas".

    With "pallas", a decode step (one token per row) with a sparsity state runs the
    sparsified projections through `pallas_kernels`: `sparse_input_matvec` reads only the
    weight rows of nonzero inputs; with `up_layout="rows"` (CATS/CHESS, where the gate
    decides), `up_proj` is stored `[m, d]` and `gated_matvec` computes only the rows
    where the gate is nonzero. `impl` is passed to the kernel dispatchers ("auto" picks
    by backend; "gpu_interpret"/"tpu_interpret" run the kernels on a CPU).
    """

    mode: str = "xla"
    # q/k/v as one `qkv_proj` matmul [d, q + 2 kv], prepared at load by `prepare_params`.
    # Only where q and k/v read the same input (every method but chess+, which thresholds
    # the q input alone): three small matvecs cost twice one fused one on an H100.
    fuse_qkv: bool = False
    # k/v as one `kv_proj` matmul [d, 2 kv] (chess+, where q reads its own input).
    fuse_kv: bool = False
    # gate_proj and up_proj as one `gate_up_proj` matmul [d, 2m], prepared at load by
    # `prepare_params`, where both read the thresholded FFN input (`ffn_in`: TEAL, WINA):
    # one sparse kernel launch per layer instead of two. Columns are interleaved per
    # neuron (gate_i, up_i), so that an even split over devices keeps each neuron's pair.
    fuse_gate_up: bool = False
    # The sparsification points (`jaxsparse.rules.TENSORS`) whose projections use a kernel;
    # the others stay dense XLA matmuls. "gate" means: up_proj stored [m, d] (rows layout,
    # prepared at load by `prepare_params`) and computed by `gated_matvec`.
    points: tuple[str, ...] = ()
    # Points whose input the method leaves dense but whose projection still runs through
    # `sparse_input_matvec` (which then reads every row): where the kernel reads a dense
    # matvec faster than XLA's fused GEMM in the decode step (the gate of CATS/CHESS:
    # `jaxsparse.registry.DENSE_KERNEL_POINTS`).
    dense_points: tuple[str, ...] = ()
    # With the "gate" point: `gated_matvec` takes the gate projection's float32 output and
    # applies the activation and a plain threshold itself (CATS, CHESS), so no XLA kernel
    # runs between the two matvecs (`llama._kernel_gate_rule`); False: XLA makes g first.
    gate_rule_in_kernel: bool = True
    impl: str = "auto"
    # Points whose sparse-input matvec runs on a GPU (or its interpreter) as two launches:
    # a list of the active rows (`pallas_kernels.compact_rows`), then full tiles of listed
    # rows (`pallas_kernels.compacted_matvec_into`) instead of fixed tiles with their
    # inactive rows masked out. Faster where most rows are inactive: on an H200 at 70%
    # sparsity 15.7-15.8 us against 17.0-17.3 for Llama-3-8B's 4096x14336 and 14336x4096,
    # at 90% 9.5-9.7 against 15.4-15.5; slower at 50% (21.4-21.7 against 20.1-20.8), where
    # the list's launch costs more than it saves (benchmarks/NOTES_kernels.md). teal at
    # S=0.9 decodes at 578 tok/s with the lists against 407 without (dense 186).
    # `jaxsparse.registry.kernels_for_method` sets it from the state's target sparsity.
    # On kernels that see whole arrays only; under a `model` split the masked kernel runs.
    compact_points: tuple[str, ...] = ()
    # gate_proj stored [m, d] (rows layout, prepared by `prepare_params`) and computed by
    # `gated_matvec` with the Deja Vu neuron mask as its gate: only predicted-active rows
    # of gate_proj are read (`mask * (x @ Wg^T)`).
    gate_proj_rows: bool = False
    # Deja Vu head masks in a decode step: q_proj stored [q, d] (rows layout, prepared by
    # `prepare_params`) computes only the selected heads' q (`gated_matvec`), attention runs
    # for those heads only (`head_sparse_attention`), and o_proj reads only their rows (the
    # `o_in` point); k/v stay dense for every head. Needs `fuse_kv` (q apart from k/v).
    head_attention: bool = False
    # A `jax.sharding.Mesh` whose `model` axis splits the weights (tensor parallelism,
    # `jaxsparse.sharding`): each device then runs the sparse kernels on its own slice of
    # the weight rows (`shard_map`) and partial sums of row-split projections are added
    # over `model`; None (or a `model` axis of 1): the kernels see whole arrays.
    mesh: Any = None
    # On GPU, one zeroed float32 accumulator per decode block that the block's split-K
    # kernel calls add into, each into its own columns (`SharedAccumulator`): one zero-fill
    # per block instead of one per call (each fill was about 0.9 us of device time on an
    # H200: benchmarks/NOTES_kernels.md). False: every call zeroes its own target.
    shared_accumulator: bool = True
    # With the shared accumulator: one buffer per part of the block (attention, the gate
    # projection alone, up or gate|up, down; `BlockAccumulators`), zeroed by one fusion,
    # so that no kernel adds into a buffer after an output that XLA reads late; False:
    # one buffer per block, and CHESS's gate its own target.
    split_accumulator: bool = True
    # With the shared accumulator: q_proj and kv_proj (chess+, each with its own input) in
    # one kernel launch (`pallas_kernels.sparse_input_matvecs_into`); False: two launches.
    q_kv_one_launch: bool = True
    # In a decode step (one token per row) with a KV cache, on a GPU (or its
    # interpreter): the attention's QK product, softmax and PV product as one kernel
    # (`pallas_kernels.head_sparse_attention` with every head selected) instead of XLA's
    # GEMMs and softmax fusions. Any mode, dense included: it reads no weights. In an XLA
    # step it also applies the o_proj input's threshold as it writes its output. On an
    # H200 (Llama-3-8B shapes, cache of 256 slots) it took 5.5 us per layer against
    # XLA's 8.7, and decode went from 183.3 to 184.9 tok/s dense, 312.0 to 316.4 teal
    # (benchmarks/NOTES_kernels.md). Heads narrower than 16 keep XLA's attention on a GPU
    # (the kernel's tensor-core tiles are 16 wide).
    decode_attention: bool = True
    # The attention kernel's slot ranges per (batch row, kv head), each run by a program
    # of its own and merged afterwards (`head_sparse_attention(num_splits=)`): more
    # programs for a short batch and a long cache. None: one 64-slot block per program,
    # at most 16 ranges (`attention_options`; the fastest of 1 to 16 at caches of 256 and 1024
    # slots on an H200). 1: one program walks every slot.
    attention_splits: int | None = None
    # With `decode_attention`, on one device: the kernel reads the new token's q, k and v
    # where the q/k/v projections left them (their float32 outputs, or the block's
    # accumulator), applies RoPE and writes k/v into the cache itself
    # (`pallas_kernels.head_sparse_attention_from_qkv`), so no slice, RoPE or
    # cache-update kernels run around it (3 per layer); False: XLA prepares q, k and v and
    # the kernel still writes the cache (`head_sparse_attention(new_kv=)`). Not for Deja
    # Vu's head-sparse steps or Gemma 3 (its q/k norms).
    packed_attention: bool = True
    # In a pallas decode step on one GPU (or its interpreter), Llama-style blocks (not
    # Gemma 3): each RMSNorm with the residual add before it and the thresholds of the
    # projections after it, plus the zero-fill of the block's accumulators at its first
    # norm, in one kernel launch (`pallas_kernels.residual_rms_norm`); the residual add
    # reads the o_proj/down_proj output where their kernel left it. False: XLA's
    # fusions (two to three small kernels per norm at batch 1).
    fused_norms: bool = True

    def __post_init__(self):
        from jaxsparse.rules import TENSORS

        if self.mode not in ("xla", "pallas"):
            raise ValueError(f"kernels={self.mode!r}: use 'xla' or 'pallas'")
        unknown = (set(self.points) | set(self.dense_points) | set(self.compact_points)) - set(
            TENSORS
        )
        if unknown:
            raise ValueError(f"kernel points {sorted(unknown)} unknown; known: {TENSORS}")
        if self.fuse_gate_up and "gate" in self.points:
            raise ValueError(
                "Kernels(fuse_gate_up=True) cannot run with the 'gate' kernel point (up_proj "
                "stored as rows for gated_matvec); drop one of them"
            )
        splits = self.attention_splits
        if splits is not None and (
            not isinstance(splits, int) or isinstance(splits, bool) or splits < 1
        ):
            raise ValueError(
                f"Kernels(attention_splits={splits!r}): use a positive int, or None (one "
                "64-slot block per program, at most 16)"
            )
        if self.head_attention and not self.fuse_kv:
            raise ValueError(
                "Kernels(head_attention=True) needs fuse_kv=True (q_proj apart from kv_proj)"
            )

    @property
    def up_rows(self) -> bool:
        return self.mode == "pallas" and "gate" in self.points

    @property
    def gate_rows(self) -> bool:
        """Whether gate_proj is stored `[m, d]` (see `gate_proj_rows`)."""
        return self.mode == "pallas" and "gate" in self.points and self.gate_proj_rows

    @property
    def q_rows(self) -> bool:
        """Whether q_proj is stored `[q, d]` (see `head_attention`)."""
        return self.mode == "pallas" and self.head_attention

    def shares_accumulator(self, x: jax.Array) -> bool:
        """Whether a decode block with input `x` gets a `SharedAccumulator`: a pallas
        decode step whose kernels run on GPU (or in its interpreter), on whole arrays."""
        from jaxsparse.sharding import MODEL
        from pallas_kernels._dispatch import resolve_impl

        if not (self.mode == "pallas" and self.shared_accumulator):
            return False
        if x.ndim != 3 or x.shape[1] != 1:
            return False
        if self.mesh is not None and self.mesh.shape.get(MODEL, 1) != 1:
            return False
        return resolve_impl(self.impl, fn_name="Kernels") in ("gpu", "gpu_interpret")

    def attention_kernel(self, t: int, cached: bool, head_dim: int) -> bool:
        """Whether a step of `t` tokens per row with a KV cache (`cached`) runs its
        attention through the kernel (`decode_attention`): on a GPU with heads at least
        16 wide, or in the GPU kernel's interpreter."""
        from pallas_kernels._dispatch import resolve_impl

        if not (self.decode_attention and t == 1 and cached):
            return False
        impl = resolve_impl(self.impl, fn_name="Kernels")
        return impl == "gpu_interpret" or (impl == "gpu" and head_dim >= 16)

    def attention_options(self, cache_slots: int) -> dict:
        """The attention kernel's options for a cache of `cache_slots` slots: on the GPU
        kernel, its slot ranges (`attention_splits`; None: one 64-slot block per range, at
        most 16); none for the TPU kernel or the reference."""
        from pallas_kernels._dispatch import resolve_impl

        if resolve_impl(self.impl, fn_name="Kernels") not in ("gpu", "gpu_interpret"):
            return {}
        splits = self.attention_splits
        if splits is None:
            splits = min(ATTENTION_MAX_SPLITS, -(-cache_slots // ATTENTION_SLOTS_PER_SPLIT))
        return {"num_splits": max(1, splits)}

    def compacts(self, point: str) -> bool:
        """Whether `point`'s sparse-input matvec reads a list of active rows
        (`compact_points`): on a GPU or in its interpreter; the TPU kernel lists its
        rows itself."""
        from pallas_kernels._dispatch import resolve_impl

        if point not in self.compact_points:
            return False
        return resolve_impl(self.impl, fn_name="Kernels") in ("gpu", "gpu_interpret")

    def use(self, point: str, x: jax.Array) -> bool:
        """Whether the projection fed by `point` uses a kernel for input `x` (decode only)."""
        used = point in self.points or point in self.dense_points
        return self.mode == "pallas" and used and x.ndim == 3 and x.shape[1] == 1


XLA = Kernels()


class SharedAccumulator:
    """One zeroed float32 buffer that the split-K kernel calls of a decode block add into,
    each into its own columns (`pallas_kernels.sparse_input_matvec_into`, in place on GPU).

    Every split-K call otherwise zeroes its own target first: a separate fill kernel per
    call, 4-5 per block. Here the buffer is zeroed once, when the first call asks for it;
    each call takes the next free columns and passes the updated buffer on, so the calls
    stay in data order.

    With `Kernels.split_accumulator` a block has one such buffer per part (`BlockAccumulators`:
    the attention, the gate alone, up or gate|up, down), all zeroed together when the
    first is needed. No kernel then adds into a buffer after an output that XLA reads
    late. With one buffer per block, XLA fuses the residual add `x + o_proj(...)` (and the
    zero counts of `act(gate) * up`) into kernels that run after later calls have added
    into the buffer in place, so it copies the buffer first: 46 copies per teal decode
    step on an H200 (benchmarks/NOTES_kernels.md, "One zero-fill per block").

    `matvec` and `matvecs` return None (the caller runs the plain kernel) for a call that
    needs no fill (K in one split: the kernel stores y) or does not fit (other rows than
    the buffer has, or no columns left).
    """

    def __init__(self, width: int, fill: _JointFill | None = None):
        self.width = width
        self.buf: jax.Array | None = None
        self.col = 0
        self._fill = fill

    @classmethod
    def for_block(cls, config, kernels: Kernels, h_BxTxD: jax.Array) -> BlockAccumulators | None:
        """The accumulators of a block of `config` with input `h` run with `kernels`, or
        None where blocks do not share one (`Kernels.shares_accumulator`). Room for every
        sparse projection the block runs (q, k/v, o, gate, up, down, in its fused layouts),
        each rounded up to whole column blocks."""
        from pallas_kernels import accumulator_shape

        if not kernels.shares_accumulator(h_BxTxD):
            return None

        def span(n: int) -> int:
            return accumulator_shape(1, n)[1]

        c, kn = config, kernels
        if kn.fuse_qkv:
            attn = span(c.q_dim + 2 * c.kv_dim)
        else:
            attn = span(c.q_dim) + (span(2 * c.kv_dim) if kn.fuse_kv else 2 * span(c.kv_dim))
        attn += span(c.hidden_size)  # o_proj
        m, d = c.intermediate_size, c.hidden_size
        llama = c.family == "llama"
        if not kn.split_accumulator:
            # CHESS's gate keeps a target of its own: gated_matvec takes it whole, and a
            # slice of this buffer would be one more copy (a custom call's operand is a
            # buffer of its own)
            ffn = span(2 * m) if kn.fuse_gate_up and llama else 2 * span(m)
            one = cls(attn + ffn + span(d))
            return BlockAccumulators(attn=one, gate=None, ffn=one, down=one)
        used = lambda *points: any(kn.use(p, h_BxTxD) for p in points)
        widths = {}
        if used("q_in", "kv_in", "o_in"):
            widths["attn"] = attn
        if used("ffn_in"):
            if kn.fuse_gate_up and llama:
                widths["ffn"] = span(2 * m)
            else:  # gate_proj alone (OPT's fc1), then up_proj unless gated_matvec runs it
                widths["gate"] = span(m)
                if llama and not kn.up_rows:
                    widths["ffn"] = span(m)
        if used("down_in", "gate"):  # down_proj (OPT's fc2 reads the "gate" point too)
            widths["down"] = span(d)
        if not widths:
            return None
        fill = _JointFill(max(widths.values()))
        parts = {name: cls(fill.width, fill) for name in widths}
        fill.parts = list(parts.values())
        return BlockAccumulators(**{n: parts.get(n) for n in ("attn", "gate", "ffn", "down")})

    def matvec(
        self,
        x_BxK: jax.Array,
        kernel_KxN: jax.Array,
        impl: str,
        threshold=None,
        compact: bool = False,
    ) -> jax.Array | None:
        """`x @ kernel` (float32 [B, N]; `threshold` applied to x in the kernel) through the
        shared buffer, or None (see above). `compact`: over a list of the active rows
        (`Kernels.compact_points`)."""
        from pallas_kernels import compact_rows, compacted_matvec_into, sparse_input_matvec_into

        span = self._room([(x_BxK, kernel_KxN)])
        if span is None:
            return None
        if compact:
            ids, xc = compact_rows(x_BxK, threshold, impl=impl)
            y, self.buf = compacted_matvec_into(self.buf, self.col, ids, xc, kernel_KxN, impl=impl)
        else:
            y, self.buf = sparse_input_matvec_into(
                self.buf, self.col, x_BxK, kernel_KxN, threshold, impl=impl
            )
        self.col += span
        return y

    def matvecs(self, pairs: list[tuple[jax.Array, jax.Array]], impl: str) -> list | None:
        """`[x_p @ kernel_p]` (float32 [B, N_p] each) in one kernel launch through the shared
        buffer (`pallas_kernels.sparse_input_matvecs_into`), or None (see above)."""
        from pallas_kernels import sparse_input_matvecs_into

        span = self._room(pairs)
        if span is None:
            return None
        ys, self.buf = sparse_input_matvecs_into(self.buf, self.col, pairs, impl=impl)
        self.col += span
        return ys

    def _room(self, pairs: list[tuple[jax.Array, jax.Array]]) -> int | None:
        """The columns the products of `pairs` take in the buffer (zeroing it on first
        use), or None where they need no fill or do not fit."""
        from pallas_kernels import accumulator_shape
        from pallas_kernels.sparse_matvec import adds_into_zeros

        x0 = pairs[0][0]
        if not adds_into_zeros(x0.shape[1]):  # one K split: the kernel stores y, no fill
            return None
        shapes = [accumulator_shape(x.shape[0], w.shape[1]) for x, w in pairs]
        rows, span = shapes[0][0], sum(s for _, s in shapes)
        if self.buf is None:
            if self._fill is None:
                self.buf = _zeros(x0, 0, (rows, self.width))
            else:
                self._fill.make(x0, rows)
        if self.buf.shape[0] != rows or self.col + span > self.width:
            return None
        return span


def _zeros(x0: jax.Array, i: int, shape: tuple[int, int]) -> jax.Array:
    """float32 zeros of `shape` (each +0.0 or -0.0, equal as addends) picked at run time
    from `x0`. XLA turns a constant fill into a memset, which ran at about 80 GB/s on an
    H200 (3.1 us for a 237 KB buffer), and this into a loop fusion
    (benchmarks/NOTES_kernels.md, "One zero-fill per block"). `i` (0-3) picks one of four
    distinct predicates, so that the buffers of one block are not merged into one by
    XLA's common-subexpression elimination."""
    v = x0[0, 0]
    pred = (v > 0, v < 0, v >= 0, v <= 0)[i]
    return jnp.broadcast_to(jnp.where(pred, 0.0, -0.0).astype(jnp.float32), shape)


class _JointFill:
    """Zeroes every part of a block's `BlockAccumulators` at once, all of one shape and
    from one input, so that XLA can make them one multi-output fusion."""

    def __init__(self, width: int):
        self.width = width
        self.parts: list[SharedAccumulator] = []

    def make(self, x0: jax.Array, rows: int) -> None:
        for i, part in enumerate(self.parts):
            part.buf = _zeros(x0, i, (rows, self.width))


@dataclasses.dataclass
class BlockAccumulators:
    """A decode block's `SharedAccumulator`s: `attn` for q, k/v and o; `gate` for the gate
    projection alone (OPT: fc1); `ffn` for up (or gate|up); `down` for down_proj (OPT:
    fc2). Without `Kernels.split_accumulator`, `attn`, `ffn` and `down` are one buffer and
    `gate` is None (the gate shares it, or with CHESS's gate rule in the kernel has a
    target of its own); with it, each is its own buffer, and one no kernel of the block
    uses is None."""

    attn: SharedAccumulator | None
    gate: SharedAccumulator | None
    ffn: SharedAccumulator | None
    down: SharedAccumulator | None

    def parts(self) -> list[SharedAccumulator]:
        """The distinct accumulators, in field order."""
        out: list[SharedAccumulator] = []
        for p in (self.attn, self.gate, self.ffn, self.down):
            if p is not None and all(p is not q for q in out):
                out.append(p)
        return out

    def zero_shapes(self, b: int) -> tuple[tuple[int, int], ...]:
        """The (rows, columns) of each of `parts()` for a batch of `b` rows: what
        `provide` takes, zeroed (by `pallas_kernels.residual_rms_norm`)."""
        from pallas_kernels import accumulator_shape

        rows = accumulator_shape(b, 1)[0]
        return tuple((rows, p.width) for p in self.parts())

    def provide(self, zeros: tuple[jax.Array, ...]) -> None:
        """Hands each of `parts()` its zeroed buffer, made elsewhere (shapes:
        `zero_shapes`), in place of the fill the first product would make."""
        for part, buf in zip(self.parts(), zeros, strict=True):
            part.buf = buf


class Linear(nn.Module):
    """`y = x @ kernel (+ bias)`, kernel `[in, out]` (or `[out, in]` with `rows=True`).

    `__call__(x, point)` in a pallas decode step where `point` is one of the kernel points
    reads only the kernel rows of nonzero inputs; `__call__(x, gate=g)` with `rows=True`
    returns `g * (x @ kernel^T)`, computing only the rows where g is nonzero. With
    `gate_rule=(activation, threshold)` the gate comes in before its activation and the
    kernel makes g (`pallas_kernels.gated_matvec.gate_values`); `accumulator=True` returns
    the float32 accumulator as it is (no cast to `dtype`). `shared`: the block's
    `SharedAccumulator`, which the sparse-input kernel then adds into. `threshold`:
    `rules.sparsify` applied to x first, inside the sparse-input kernel where one runs on
    whole arrays (no XLA kernel between the input's producer and this one).
    """

    features: int
    axes: tuple[str, str]
    use_bias: bool = False
    dtype: Any = jnp.float32
    kernels: Kernels = XLA
    rows: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        point: str | None = None,
        gate: jax.Array | None = None,
        gate_rule: tuple[str, jax.Array] | None = None,
        accumulator: bool = False,
        shared: SharedAccumulator | None = None,
        threshold: jax.Array | None = None,
    ):
        shape = (self.features, x.shape[-1]) if self.rows else (x.shape[-1], self.features)
        axes = self.axes[::-1] if self.rows else self.axes
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), axes),
            shape,
            self.dtype,
        )
        x = x.astype(self.dtype)
        k = self.kernels
        if gate is not None and self.rows and k.use("gate", x) and not self.use_bias:
            from pallas_kernels import gated_matvec

            b = x.shape[0]
            if gate_rule is None:
                gate, extra = gate.reshape(b, -1).astype(self.dtype), ()
                fn = lambda x2, g2, w: gated_matvec(x2, g2, w, impl=k.impl)
            else:  # the pre-activation as it comes (float32), the threshold per row
                act, extra = gate_rule[0], (gate_rule[1],)
                gate = gate.reshape(b, -1)
                fn = lambda x2, g2, t, w: gated_matvec(
                    x2, g2, w, activation=act, threshold=t, impl=k.impl
                )
            h = per_shard(fn, k.mesh, x.reshape(b, -1), gate, kernel, axes, rows=True, extra=extra)
            return h.reshape(b, 1, -1)
        if gate_rule is not None:
            raise ValueError(
                f"{self.name}: gate_rule= needs the gated_matvec kernel path (rows=True, "
                "a pallas decode step, no bias)."
            )
        sparse_kernel = point is not None and not self.rows and k.use(point, x)
        if threshold is not None and not (sparse_kernel and _whole(k.mesh)):
            x, threshold = rules.sparsify(x, threshold), None  # no kernel to fuse it into
        if sparse_kernel:
            from pallas_kernels import sparse_input_matvec

            b = x.shape[0]
            # the kernel rounds the threshold to x's dtype, as `rules.sparsify` does
            t = threshold
            compact = k.compacts(point)
            y = None
            if shared is not None:
                y = shared.matvec(x.reshape(b, -1), kernel, k.impl, t, compact=compact)
            if y is None and compact and _whole(k.mesh):
                from pallas_kernels import compacted_input_matvec

                y = compacted_input_matvec(
                    x.reshape(b, -1), kernel, t, impl=k.impl, out_dtype=jnp.float32
                )
            if y is None:
                y = per_shard(  # float32 out: the accumulator as it is, no cast pass
                    lambda x2, w: sparse_input_matvec(x2, w, t, impl=k.impl, out_dtype=jnp.float32),
                    k.mesh,
                    x.reshape(b, -1),
                    None,
                    kernel,
                    axes,
                )
            y = y.reshape(b, 1, -1)  # float32 already
        elif self.rows:
            y = jnp.einsum("...i,oi->...o", x, kernel, preferred_element_type=jnp.float32)
        else:
            y = jnp.dot(x, kernel, preferred_element_type=jnp.float32)
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:]),
                (self.features,),
                self.dtype,
            )
            y = y + bias.astype(jnp.float32)
        if accumulator and gate is None:
            return y
        y = y.astype(self.dtype)
        return y if gate is None else gate.astype(self.dtype) * y


def _whole(mesh) -> bool:
    """Whether kernels see whole arrays under `mesh` (none, or a `model` axis of 1)."""
    from jaxsparse.sharding import MODEL

    return mesh is None or mesh.shape[MODEL] == 1


def _one_device(mesh) -> bool:
    """Whether a step under `mesh` runs on one device (none, or `data` and `model` axes
    of 1): where the packed attention and the fused norms apply."""
    from jaxsparse.sharding import DATA

    return _whole(mesh) and (mesh is None or mesh.shape[DATA] == 1)


def per_shard(
    fn, mesh, x_BxK, gate_BxN, kernel, axes: tuple[str, str], rows: bool = False, extra=()
):
    """`fn(x, kernel)` (or `fn(x, gate, *extra, kernel)` for a rows-layout kernel `[N, K]`
    with its gate `[B, N]` and `extra` arrays `[N]`) run by each device of `mesh` on its
    own slice of the kernel, as
    `jaxsparse.sharding` lays it out from the logical `axes` (kernel order). An output axis
    split over `model` stays split; a split input axis (o_proj, down_proj) gives partial
    sums, added over `model` in float32 (then cast back). Without a mesh, or with a
    `model` axis of 1: `fn` on the whole arrays."""
    from jax.sharding import PartitionSpec as P

    from jaxsparse.sharding import DATA, logical_to_mesh

    args = (x_BxK, kernel) if gate_BxN is None else (x_BxK, gate_BxN, *extra, kernel)
    if _whole(mesh):
        return fn(*args)
    spec = logical_to_mesh(P(*axes), mesh, shape=kernel.shape)
    k_spec, n_spec = (spec[1], spec[0]) if rows else (spec[0], spec[1])
    b = x_BxK.shape[0]
    b_spec = DATA if mesh.shape[DATA] > 1 and b % mesh.shape[DATA] == 0 else None
    in_specs = [P(b_spec, k_spec)]
    if gate_BxN is not None:
        in_specs += [P(b_spec, n_spec)] + [P(n_spec) for _ in extra]
    in_specs.append(spec)

    def body(*a):
        y = fn(*a)
        if k_spec is not None:  # each device holds some input rows: partial sums
            y = jax.lax.psum(y.astype(jnp.float32), k_spec).astype(y.dtype)
        return y

    return jax.shard_map(
        body, mesh=mesh, in_specs=tuple(in_specs), out_specs=P(b_spec, n_spec), check_vma=False
    )(*args)


class RMSNorm(nn.Module):
    """RMSNorm; with `unit_offset` (Gemma) the output is scaled by `1 + scale`, in float32."""

    eps: float
    dtype: Any = jnp.float32
    unit_offset: bool = False

    @nn.compact
    def __call__(self, x, fused: dict | None = None):
        """The norm of `x` [..., D]. `fused` (a pallas decode step: `Kernels.fused_norms`):
        the keyword arguments `thresholds`, `normed`, `zeros` and `impl` of
        `pallas_kernels.residual_rms_norm`, which then runs on `x` (an array [B, 1, D], or
        a `PendingResidual` whose add it does) and whose `RmsNormOut` is returned, its
        [B, D] outputs as [B, 1, D]."""
        init = nn.initializers.zeros if self.unit_offset else nn.initializers.ones
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(init, ("norm",)),
            (x.shape[-1],),
            self.dtype,
        )
        if fused is not None:
            if self.unit_offset:
                raise ValueError("RMSNorm(unit_offset=True) (Gemma) has no fused kernel")
            return _fused_rms_norm(x, scale, self.eps, **fused)
        x = value_of(x)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.unit_offset:  # HF Gemma: (hidden * (1 + weight)).to(input_dtype)
            return (x32 * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)
        return scale * x32.astype(self.dtype)  # HF: weight * hidden.to(input_dtype)


def _fused_rms_norm(x, scale, eps: float, *, thresholds, normed, zeros, impl):
    """`RMSNorm`'s `fused` path (see there)."""
    from pallas_kernels import residual_rms_norm

    base, delta, col = (x.x, x.delta, x.col) if isinstance(x, PendingResidual) else (x, None, 0)
    b, t, d = base.shape
    if t != 1:
        raise ValueError(f"RMSNorm(fused=...) takes one token per row, got input {base.shape}")
    out = residual_rms_norm(
        base.reshape(b, d),
        scale,
        eps=eps,
        delta=delta,
        delta_col=col,
        thresholds=thresholds,
        normed=normed,
        zeros=zeros,
        impl=impl,
    )
    row = lambda a: None if a is None else a.reshape(b, 1, d)
    return out._replace(
        residual=row(out.residual), normed=row(out.normed), kept=tuple(map(row, out.kept))
    )


@flax.struct.dataclass
class PendingResidual:
    """The residual stream `x + delta[:B, col:col + D]` (delta rounded to x's dtype first)
    with the add not yet done: a block's output in a pallas decode step whose next norm
    does the add in its own kernel (`Kernels.fused_norms`), reading the down_proj output
    (`delta`, float32 [B' >= B, W]) where its kernel left it. `value()` does the add in
    XLA, for any other consumer. `x` is [B, 1, D]; `col` is static."""

    x: jax.Array
    delta: jax.Array
    col: int = flax.struct.field(pytree_node=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.x.shape

    @property
    def ndim(self) -> int:
        return self.x.ndim

    @property
    def dtype(self):
        return self.x.dtype

    def value(self) -> jax.Array:
        b, d = self.x.shape[0], self.x.shape[-1]
        add = self.delta[:b, self.col : self.col + d].astype(self.x.dtype)
        return self.x + add.reshape(self.x.shape)


def value_of(x):
    """`x`, or the value of a `PendingResidual`."""
    return x.value() if isinstance(x, PendingResidual) else x


class LayerNorm(nn.Module):
    eps: float
    affine: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        if self.affine:
            init = nn.with_logical_partitioning
            scale = self.param(
                "scale", init(nn.initializers.ones, ("norm",)), (x.shape[-1],), self.dtype
            )
            bias = self.param(
                "bias", init(nn.initializers.zeros, ("norm",)), (x.shape[-1],), self.dtype
            )
            y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


class Embed(nn.Module):
    num_embeddings: int
    features: int
    axes: tuple[str, str] = ("vocab", "embed")
    dtype: Any = jnp.float32

    def setup(self):
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), self.axes),
            (self.num_embeddings, self.features),
            self.dtype,
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding, ids, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied output projection: x @ embedding^T, in float32."""
        return jnp.dot(x.astype(self.dtype), self.embedding.T, preferred_element_type=jnp.float32)


def rope_cos_sin(
    config: ModelConfig, positions_BxT: jax.Array, layer_type: str = FULL
) -> tuple[jax.Array, jax.Array]:
    """RoPE tables [B, T, head_dim] for the layers of `layer_type` (Gemma 3 has two bases)."""
    inv_freq = jnp.asarray(rope_inv_freq(config, layer_type))
    pos = jnp.maximum(positions_BxT, 0).astype(jnp.float32)
    freqs_BxTxF = pos[..., None] * inv_freq
    emb = jnp.concatenate([freqs_BxTxF, freqs_BxTxF], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_BxTxHxD: jax.Array, cos_BxTxD: jax.Array, sin_BxTxD: jax.Array) -> jax.Array:
    """HF Llama's rotate-half RoPE, in float32, rounded back to x's dtype (the same steps
    as the decode attention kernel's, `pallas_kernels.head_sparse_attention`)."""
    from pallas_kernels.head_sparse_attention import rope_rotate_half

    return rope_rotate_half(x_BxTxHxD, cos_BxTxD[:, :, None, :], sin_BxTxD[:, :, None, :])


def attention_mask(
    q_pos_BxT: jax.Array, kv_pos_BxS: jax.Array, sliding_window: int | None = None
) -> jax.Array:
    """[B, T, S] bool: causal over positions, empty or padded slots (pos < 0) excluded."""
    q = q_pos_BxT[:, :, None]
    k = kv_pos_BxS[:, None, :]
    mask = (k >= 0) & (k <= q)
    if sliding_window is not None:
        mask &= (q - k) < sliding_window
    return mask


def attend(q_BxTxHxD, k_BxKxSxD, v_BxKxSxD, mask_BxTxS, scale: float) -> jax.Array:
    """Grouped-query attention; softmax in float32. Returns [B, T, H * D]."""
    b, t, h, d = q_BxTxHxD.shape
    kv_heads = k_BxKxSxD.shape[1]
    q_BxKxGxTxD = q_BxTxHxD.reshape(b, t, kv_heads, h // kv_heads, d).transpose(0, 2, 3, 1, 4)
    scores_BxKxGxTxS = (
        jnp.einsum("bkgtd,bksd->bkgts", q_BxKxGxTxD, k_BxKxSxD, preferred_element_type=jnp.float32)
        * scale
    )
    scores_BxKxGxTxS = jnp.where(mask_BxTxS[:, None, None], scores_BxKxGxTxS, MASK_VALUE)
    probs = jax.nn.softmax(scores_BxKxGxTxS, axis=-1).astype(v_BxKxSxD.dtype)
    out_BxKxGxTxD = jnp.einsum(
        "bkgts,bksd->bkgtd", probs, v_BxKxSxD, preferred_element_type=jnp.float32
    )
    out_BxTxKxGxD = out_BxKxGxTxD.transpose(0, 3, 1, 2, 4)
    return out_BxTxKxGxD.reshape(b, t, h * d).astype(q_BxTxHxD.dtype)


def update_layer_cache(layer_cache: dict, k_BxKxTxD, v_BxKxTxD, index) -> dict:
    k = jax.lax.dynamic_update_slice_in_dim(
        layer_cache["k"], k_BxKxTxD.astype(layer_cache["k"].dtype), index, axis=2
    )
    v = jax.lax.dynamic_update_slice_in_dim(
        layer_cache["v"], v_BxKxTxD.astype(layer_cache["v"].dtype), index, axis=2
    )
    return {"k": k, "v": v}


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
    """An empty KV cache for `batch` sequences of up to `max_len` tokens."""
    dtype = jnp.dtype(dtype or config.dtype)
    shape = (batch, config.num_kv_heads, max_len, config.head_dim)
    cache = {"pos": jnp.full((batch, max_len), -1, jnp.int32)}
    for i in range(config.num_layers):
        cache[f"layers_{i}"] = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
    return cache


def positions_from_mask(valid_BxT: np.ndarray | jax.Array, start=0):
    """Positions 0, 1, ... over the valid (non-padding) tokens of each row; -1 on padding."""
    valid = jnp.asarray(valid_BxT).astype(jnp.int32)
    return jnp.where(valid > 0, jnp.cumsum(valid, axis=-1) - 1 + start, -1)
