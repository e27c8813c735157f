"""Sparse-input matvec over a compacted list of active rows (GPU, batch 1 to 8).

`sparse_matvec.py`'s GPU kernel gives every program a fixed (block_k x block_n) tile of W
and masks the inactive rows out of its load. Where most rows are inactive, most of those
programs load x, find a few active rows and still issue their atomics. Here the active
rows are first listed in order (`compact_rows`), and program (n, s) reads rows
`ids[s * block_k : (s + 1) * block_k]` of column block n: full tiles until the list runs
out, then programs that return at once. The grid is sized for the dense case, so it does
not depend on the data (CUDA-graph safe), and a program past the list's end issues no
load and no atomic. On an H200 that halves the matvec at 90% sparsity; at 50% full tiles
of scattered rows read no faster than masked ones (benchmarks/NOTES_kernels.md, "Lists of
active rows"), so the decode path uses the lists from a target sparsity of 0.65 on
(`jaxsparse.registry.COMPACT_FROM_SPARSITY`).

The list is kept per segment of `segment` channels: within each segment its active rows
come first, ascending, then -1 for the rest. One program makes one segment's list, so the
list kernel runs in parallel (`default_segment`: up to 1024 channels each), and a kernel
that writes x one block at a time (the norm, attention) could write its block's list too.
A tile of the matvec never spans two segments when `segment` is a multiple of `block_k`;
the last tile of each segment's list is partly filled.

Holds:
- `compact_rows_reference` / `compact_rows`: (ids int32 [K], xc [B, K]) from x and an
  optional threshold: `ids` the active rows (the union over batch rows) per segment, -1
  after them; `xc` x (thresholded) at those rows, 0 at -1. GPU: one program per segment.
- `compacted_matvec_into`: `y += xc @ W[ids]` into given columns of a float32
  accumulator (split-K atomics; the accumulator is the caller's, as in
  `sparse_matvec.sparse_input_matvec_into`). Batch 1 multiplies row by row (32 x 256
  tiles); from batch 2 the batch, padded to 16 rows (`accumulator_rows`), on the tensor
  cores (128 x 128 tiles; `default_blocks`), the atomics masked to the real rows.
- `compacted_input_matvec`: both launches, from x to y.

Leaves out: TPU (its kernel in `sparse_matvec.py` already copies compacted rows, one DMA
each); float16 weights are accepted but not tuned.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _dispatch as dsp
from pallas_kernels.sparse_matvec import _check as check_product
from pallas_kernels.sparse_matvec import _dot_dtype
from pallas_kernels.sparse_matvec import _target_rows as target_rows

_NAME = "compacted_matvec"

# From benchmarks/results/compacted_rows_h200/compacted_matvec_h200.json (H200, bf16,
# batch 1): 32 x 256 tiles were the fastest of five at 70% and 90% on both Llama-3-8B FFN
# shapes (14.0 / 7.8-8.0 us) and within 0.8 us of the best at 50%.
DEFAULT_BLOCK_K = 32
DEFAULT_BLOCK_N = 256
# From batch 2 on (the tensor-core path), compacted_matvec_b48_dot_h200.json there: 128 x
# 128 was the fastest of 32 x 256, 64 x 256 and 128 x 128 at batches 4 and 8 and every
# sparsity (batch 4, 90%: 20.9-21.2 us against 22.0-23.7).
DEFAULT_DOT_BLOCK_K = 128
DEFAULT_DOT_BLOCK_N = 128
DEFAULT_NUM_WARPS = 4


def default_blocks(B: int, dot: bool | None = None) -> tuple[int, int]:
    """(block_k, block_n) for B batch rows: 32 x 256 row by row, 128 x 128 on the tensor
    cores (`dot`; default from batch 2 on)."""
    if B >= 2 if dot is None else dot:
        return DEFAULT_DOT_BLOCK_K, DEFAULT_DOT_BLOCK_N
    return DEFAULT_BLOCK_K, DEFAULT_BLOCK_N


MAX_SEGMENT = 1024  # one list-making program's share: a 14336-long scan in one program took 78 us


def default_segment(K: int) -> int:
    """K itself up to `MAX_SEGMENT`, else the largest divisor of K no longer than that,
    preferring multiples of `DEFAULT_BLOCK_K` (whole tiles per segment): 1024 for K = 4096
    and 14336, 768 for 1536, 576 for 576."""
    if K <= MAX_SEGMENT:
        return K
    divisors = [d for d in range(MAX_SEGMENT, 0, -1) if K % d == 0]
    whole = [d for d in divisors if d % DEFAULT_BLOCK_K == 0]
    return (whole or divisors)[0]


def _segment(K: int, segment: int | None) -> int:
    seg = default_segment(K) if segment is None else segment
    if not isinstance(seg, int) or seg <= 0 or (seg != K and K % seg):
        raise ValueError(
            f"{_NAME}: segment={segment!r} must be a positive int dividing K={K} (or None "
            f"for the default, {default_segment(K)})."
        )
    return seg


def _kept(x_BxK: jax.Array, threshold: Any) -> jax.Array:
    if threshold is None:
        return x_BxK
    t = dsp.threshold_row(_NAME, threshold, x_BxK.shape[1]).astype(x_BxK.dtype)
    return jnp.where(jnp.abs(x_BxK) >= t, x_BxK, jnp.zeros((), x_BxK.dtype))


# ----------------------------------------------------------------------- compaction


def compact_rows_reference(
    x_BxK: jax.Array, threshold: Any = None, *, segment: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """(ids int32 [K], xc [B, K] in x's dtype): per segment, the rows where some batch
    row of x (thresholded: `abs(x) >= t`, t rounded to x's dtype) is nonzero, ascending,
    then -1; xc holds x at those rows and 0 after them."""
    dsp.check_ndim(_NAME, "x_BxK", x_BxK, 2, "[B, K]")
    K = x_BxK.shape[1]
    seg = _segment(K, segment)
    xk = _kept(x_BxK, threshold)
    active = jnp.any(xk != 0, axis=0).reshape(K // seg, seg)
    # a stable partition of each segment: active rows first, in order
    order = jnp.argsort(~active, axis=1, stable=True).astype(jnp.int32)
    on = jnp.take_along_axis(active, order, axis=1)
    rows = order + (jnp.arange(K // seg, dtype=jnp.int32) * seg)[:, None]
    ids = jnp.where(on, rows, -1).reshape(K)
    xc = jnp.where(ids[None, :] >= 0, xk[:, jnp.maximum(ids, 0)], jnp.zeros((), xk.dtype))
    return ids, xc


def _compact_kernel(*refs, B, seg, BS, has_t):
    """Program g: segment g. Each row's position is its rank among the segment's active
    rows (a prefix sum), or, for an inactive row, the count plus its rank among the
    inactive ones: every position gets exactly one write."""
    if has_t:
        x_ref, t_ref, ids_ref, xc_ref = refs
    else:
        x_ref, ids_ref, xc_ref = refs
        t_ref = None
    g = pl.program_id(0)
    zero = 0 * g
    rows = dsp.static_indices(B)
    lane = jnp.arange(BS)
    ok = lane < seg
    k0 = g * seg
    xs = []
    for b in range(B):
        x = dsp.masked_load(x_ref.at[rows[b], pl.ds(k0, BS)], ok)
        if has_t:
            t = dsp.masked_load(t_ref.at[zero, pl.ds(k0, BS)], ok).astype(x.dtype)
            x = jnp.where(jnp.abs(x) >= t, x, jnp.zeros((), x.dtype))
        xs.append(x)
    active = ok & (xs[0] != 0)
    for x in xs[1:]:
        active = active | (ok & (x != 0))
    on = active.astype(jnp.int32)
    before = jnp.cumsum(on) - on  # active rows before this one
    count = jnp.sum(on)
    # a permutation of [0, BS): the lanes past the segment are inactive and come last
    pos = jnp.where(active, before, count + (lane - before))
    where = g * BS + pos  # the outputs have BS (a power of 2 >= seg) slots per segment
    dsp.masked_store(ids_ref.at[where], jnp.where(active, k0 + lane, -1), None)
    for b in range(B):
        xb = jnp.where(active, xs[b], jnp.zeros((), xs[b].dtype))
        dsp.masked_store(xc_ref.at[rows[b], where], xb, None)


@functools.partial(jax.jit, static_argnames=("segment", "num_warps", "interpret"))
def _compact_rows_gpu(x_BxK, threshold, *, segment, num_warps, interpret):
    B, K = x_BxK.shape
    seg = _segment(K, segment)
    BS = 1 << (seg - 1).bit_length()
    has_t = threshold is not None
    args = [x_BxK] + ([dsp.threshold_row(_NAME, threshold, K)] if has_t else [])
    n_seg = K // seg
    ids, xc = pl.pallas_call(
        functools.partial(_compact_kernel, B=B, seg=seg, BS=BS, has_t=has_t),
        out_shape=(
            jax.ShapeDtypeStruct((n_seg * BS,), jnp.int32),
            jax.ShapeDtypeStruct((B, n_seg * BS), x_BxK.dtype),
        ),
        grid=(K // seg,),
        compiler_params=dsp.triton_compiler_params(num_warps, 1),
        interpret=interpret,
        name="compact_rows",
    )(*args)
    if BS != seg:  # drop each segment's padding slots (they hold -1 and 0)
        ids = ids.reshape(n_seg, BS)[:, :seg].reshape(K)
        xc = xc.reshape(B, n_seg, BS)[:, :, :seg].reshape(B, K)
    return ids, xc


def compact_rows(
    x_BxK: jax.Array,
    threshold: Any = None,
    *,
    segment: int | None = None,
    impl: str = "auto",
    num_warps: int = 4,
) -> tuple[jax.Array, jax.Array]:
    """The active rows of x, listed per segment (see `compact_rows_reference`); on GPU one
    kernel launch, one program per segment."""
    which = dsp.resolve_impl(impl, fn_name="compact_rows")
    dsp.check_ndim(_NAME, "x_BxK", x_BxK, 2, "[B, K]")
    dsp.check_float(_NAME, "x_BxK", x_BxK)
    if which in ("gpu", "gpu_interpret"):
        return _compact_rows_gpu(
            x_BxK,
            threshold,
            segment=segment,
            num_warps=num_warps,
            interpret=which == "gpu_interpret",
        )
    return compact_rows_reference(x_BxK, threshold, segment=segment)


# --------------------------------------------------------------------------- matvec


def _matvec_kernel(
    ids_ref,
    xc_ref,
    w_ref,
    acc_in,
    acc_ref,
    *,
    B,
    K,
    N,
    block_k,
    block_n,
    col,
    rows_p,
    dot_dtype,
    mask_rows,
):
    """Program (n, s): compacted rows [s * block_k, (s + 1) * block_k) of column block n.

    `dot_dtype` None: batch rows one by one (multiply + sum over the tile); else x's
    `rows_p` rows (B padded with zero rows) times the W tile on the tensor cores, the
    atomics masked to the B real rows where `mask_rows` (not in the interpreter, which
    has no rule for masked atomics; the padded rows add zeros there)."""
    del acc_in  # aliased with acc_ref
    n, s = pl.program_id(0), pl.program_id(1)
    rows = dsp.static_indices(B)
    p0 = s * block_k
    n0 = n * block_n
    lane = jnp.arange(block_k)
    in_k = None if K % block_k == 0 else p0 + lane < K
    ids = dsp.masked_load(ids_ref.at[pl.ds(p0, block_k)], in_k, -1)
    valid = ids >= 0
    live = jnp.sum(valid.astype(jnp.int32))

    @pl.when(live > 0)
    def _():
        shape = (block_k, block_n)
        # rows and columns both as index arrays (a gather): the interpreter's load rule
        # takes all-array or all-slice indices, not a mix; Triton sees the columns'
        # contiguity either way and loads each row segment vectorized
        k_idx = jnp.broadcast_to(jnp.where(valid, ids, 0)[:, None], shape)
        n_idx = jnp.broadcast_to((n0 + jnp.arange(block_n))[None, :], shape)
        mask = valid[:, None]
        if N % block_n:
            mask = mask & (n0 + jnp.arange(block_n) < N)[None, :]
        mask = jnp.broadcast_to(mask, shape)
        w = dsp.masked_load(w_ref.at[k_idx, n_idx], mask, 0.0, eviction="evict_first")
        if dot_dtype is not None:
            ok = None if in_k is None else jnp.broadcast_to(in_k[None, :], (rows_p, block_k))
            x = dsp.masked_load(xc_ref.at[pl.ds(0, rows_p), pl.ds(p0, block_k)], ok, 0.0)
            part = dsp.triton_dot(x.astype(dot_dtype), w.astype(dot_dtype))
            real = None
            if mask_rows:
                real = jnp.broadcast_to((jnp.arange(rows_p) < B)[:, None], (rows_p, block_n))
            dsp.atomic_add(acc_ref, (pl.ds(0, rows_p), pl.ds(col + n0, block_n)), part, real)
            return
        w = w.astype(jnp.float32)
        for b in range(B):
            x = dsp.masked_load(xc_ref.at[rows[b], pl.ds(p0, block_k)], in_k, 0.0)
            part = jnp.sum(x.astype(jnp.float32)[:, None] * w, axis=0)
            dsp.atomic_add(acc_ref, (rows[b], pl.ds(col + n0, block_n)), part)


@functools.partial(
    jax.jit,
    static_argnames=("col", "block_k", "block_n", "num_warps", "num_stages", "interpret", "dot"),
)
def _compacted_matvec_gpu(
    acc, ids, xc, w_KxN, *, col, block_k, block_n, num_warps, num_stages, interpret, dot
):
    B, K = xc.shape
    N = w_KxN.shape[1]
    n_col = dsp.cdiv(N, block_n)
    rows_p, dot_dtype = B, None
    if dot:
        rows_p = target_rows(B, True)
        dot_dtype = _dot_dtype(xc.dtype, w_KxN.dtype)
        xc = jnp.pad(xc, ((0, rows_p - B), (0, 0)))
    kernel = functools.partial(
        _matvec_kernel,
        B=B,
        K=K,
        N=N,
        block_k=block_k,
        block_n=block_n,
        col=col,
        rows_p=rows_p,
        dot_dtype=dot_dtype,
        mask_rows=not interpret,
    )
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(acc.shape, jnp.float32),
        grid=(n_col, dsp.cdiv(K, block_k)),
        input_output_aliases={3: 0},
        compiler_params=dsp.triton_compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="compacted_matvec",
    )(ids, xc, w_KxN, acc)
    return out[:B, col : col + N], out


def accumulator_rows(B: int, dot: bool | None = None) -> int:
    """Rows the GPU kernel's accumulator needs for B batch rows: B, or on the tensor-core
    path (`dot`; default from batch 2 on) B padded to a power of 2 of at least 16."""
    return target_rows(B, B >= 2 if dot is None else bool(dot))


def accumulator_columns(N: int, block_n: int = DEFAULT_BLOCK_N) -> int:
    """Columns one product of width N takes in the accumulator (whole column blocks)."""
    return dsp.cdiv(N, block_n) * block_n


def compacted_matvec_into(
    acc: jax.Array,
    col: int,
    ids: jax.Array,
    xc: jax.Array,
    w_KxN: jax.Array,
    *,
    impl: str = "auto",
    block_k: int | None = None,
    block_n: int | None = None,
    num_warps: int = DEFAULT_NUM_WARPS,
    num_stages: int = 3,
    dot: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Adds `xc @ W[ids]` (rows with id -1 skipped) into columns `[col, col + N)` of the
    float32 accumulator `acc` [rows, columns]; returns (those columns [B, N], acc').

    `ids`, `xc` as `compact_rows` gives them. On GPU the kernel adds in place with
    atomics into whole column blocks (`accumulator_columns(N)` columns past `col`).
    `dot` (default: from batch 2 on) multiplies the batch rows, padded to
    `accumulator_rows(B)` (16 or more), on the tensor cores; `acc` then needs that many
    rows (the padding rows are left as they were). Block sizes None: `default_blocks`."""
    which = dsp.resolve_impl(impl, fn_name=f"{_NAME}_into")
    dsp.check_ndim(_NAME, "xc", xc, 2, "[B, K]")
    dsp.check_ndim(_NAME, "w_KxN", w_KxN, 2, "[K, N]")
    dsp.check_dim(_NAME, "w_KxN.shape[0] (K)", w_KxN.shape[0], xc.shape[1])
    dsp.check_dim(_NAME, "ids.shape[0] (K)", ids.shape[0], xc.shape[1])
    B, N = xc.shape[0], w_KxN.shape[1]
    gpu = which in ("gpu", "gpu_interpret")
    dot = B >= 2 if dot is None else bool(dot)
    dk, dn = default_blocks(B, dot)
    block_k, block_n = block_k or dk, block_n or dn
    dsp.check_block(_NAME, "block_k", block_k, power_of_2=True)
    dsp.check_block(_NAME, "block_n", block_n, power_of_2=True)
    rows = accumulator_rows(B, dot) if gpu else B
    if (
        getattr(acc, "ndim", None) != 2
        or jnp.dtype(acc.dtype) != jnp.float32
        or acc.shape[0] < rows
        or acc.shape[1] < col + accumulator_columns(N, block_n)
    ):
        raise ValueError(
            f"{_NAME}_into: acc must be float32 [>= {rows}, >= "
            f"{col + accumulator_columns(N, block_n)}] for col={col}, N={N}, "
            f"block_n={block_n}; got {getattr(acc, 'dtype', None)} "
            f"{getattr(acc, 'shape', None)}."
        )
    if gpu:
        return _compacted_matvec_gpu(
            acc,
            ids,
            xc,
            w_KxN,
            col=col,
            dot=dot,
            block_k=block_k,
            block_n=block_n,
            num_warps=num_warps,
            num_stages=num_stages,
            interpret=which == "gpu_interpret",
        )
    valid = ids >= 0
    w = jnp.where(valid[:, None], w_KxN[jnp.maximum(ids, 0)], 0).astype(jnp.float32)
    y = jnp.dot(xc.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)
    acc = acc.at[:B, col : col + N].add(y)
    return acc[:B, col : col + N], acc


def compacted_input_matvec(
    x_BxK: jax.Array,
    w_KxN: jax.Array,
    threshold: Any = None,
    *,
    impl: str = "auto",
    segment: int | None = None,
    block_k: int | None = None,
    block_n: int | None = None,
    num_warps: int = DEFAULT_NUM_WARPS,
    out_dtype: Any = None,
    dot: bool | None = None,
) -> jax.Array:
    """`y[B, N] = (x * (abs(x) >= t)) @ W` as two launches: the row list (`compact_rows`),
    then the matvec over it (`compacted_matvec_into` on a zeroed accumulator). Returns y
    in `out_dtype` (default x's dtype; float32 is the accumulator, with no cast)."""
    check_product(x_BxK, w_KxN, threshold, _NAME)
    B, N = x_BxK.shape[0], w_KxN.shape[1]
    ids, xc = compact_rows(x_BxK, threshold, segment=segment, impl=impl)
    block_n = block_n or default_blocks(B, dot)[1]
    acc = jnp.zeros((accumulator_rows(B, dot), accumulator_columns(N, block_n)), jnp.float32)
    y, _ = compacted_matvec_into(
        acc,
        0,
        ids,
        xc,
        w_KxN,
        impl=impl,
        block_k=block_k,
        block_n=block_n,
        num_warps=num_warps,
        dot=dot,
    )
    out = jnp.dtype(x_BxK.dtype if out_dtype is None else out_dtype)
    return y if out == jnp.float32 else y.astype(out)
