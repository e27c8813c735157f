"""Sparse-input matvec: `y[B, N] = x[B, K] @ W[K, N]` reading only the rows of W in use.

Row `k` of `W` is read only when some `x[b, k]` survives: `x[b, k] != 0`, or, with a
fused `threshold` t (a scalar, or one per input channel `[K]`), `abs(x[b, k]) >= t` with
t rounded to x's dtype first; entries with `abs(x) < t` are zeroed, as everywhere in
jaxsparse (`jaxsparse.rules.sparsify` compares in x's dtype: the same entries are kept).
W is stored `[K, N]` so that each input channel's row is contiguous. Used for down_proj,
o_proj, q_proj and every TEAL projection.

Holds:
- `sparse_input_matvec_reference`: pure jnp, float32 accumulation, returns x.dtype.
- `_sparse_input_matvec_gpu`: Pallas on the Triton lowering (TEAL's design). Grid
  (N blocks x K splits); each program walks its range of K blocks, builds the row mask
  from x, loads only the active rows of its W tile with a masked load (masked-out rows
  cost no memory traffic) and reduces in float32. With one K split
  (`split_k=1`) it stores y directly in x.dtype: one launch, no zero-fill, no atomics.
  With several splits (the default: one (block_k x block_n) tile per program, as in
  TEAL) it adds into a zeroed float32 buffer with atomics (split-K) and casts after.
- `_sparse_input_matvec_tpu`: Pallas on Mosaic TPU. Outside the kernel, the threshold
  is applied and the active rows (some x[b, k] != 0) are compacted into an ascending
  index list and a count, prefetched as scalars; x is gathered to match. The kernel (one
  program per column block of W) copies each active row of its column block from HBM
  into VMEM with its own DMA, double-buffered in chunks of `block_k` rows
  (pallas_kernels/_row_dma.py), and accumulates `x_chunk @ W_rows` in float32.
- `sparse_input_matvec`: the dispatcher (by `jax.default_backend()`, or `impl=`).
- `sparse_input_matvec_into` / `sparse_input_matvecs_into`: the same product(s) added into
  given columns of a float32 accumulator (on GPU in place: the split-K target is the
  caller's buffer, so a decode block's calls share one zero-fill; the second runs several
  products, each with its own input, in one launch). `accumulator_shape` sizes the buffer.

Leaves out: on GPU, a list of the active rows before the kernel: that is
`pallas_kernels/compacted_matvec.py` (one more launch; faster from ~65% sparsity on,
where most masked tiles here would be nearly empty); quantized weights; and batch sizes
where a dense matmul wins (the union of active rows grows with B; the dispatcher does not
switch).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _dispatch as dsp
from pallas_kernels import _row_dma as rdma

_NAME = "sparse_input_matvec"

# Tile defaults from the device-time sweep on an H200 (benchmarks/results/kernels_h200.json,
# benchmarks/NOTES_kernels.md): at batch 1, 64 x 512 tiles, one per program, were fastest on
# both Llama-3-8B shapes at 50% (19.9 / 20.8 us; 128 x 64: 21.8 / 21.7 us).
DEFAULT_BLOCK_K = 64
DEFAULT_BLOCK_N = 512
DEFAULT_NUM_WARPS = 4


def _check(x_BxK: jax.Array, w_KxN: jax.Array, threshold: Any, name: str = _NAME) -> None:
    """The arguments of a sparse-input product `x @ W` (also `compacted_matvec`'s, under
    its `name`)."""
    dsp.check_ndim(name, "x_BxK", x_BxK, 2, "[B, K]")
    dsp.check_ndim(name, "w_KxN", w_KxN, 2, "[K, N]")
    dsp.check_float(name, "x_BxK", x_BxK)
    dsp.check_float(name, "w_KxN", w_KxN)
    dsp.check_dim(name, "w_KxN.shape[0] (K)", w_KxN.shape[0], x_BxK.shape[1])
    if threshold is not None:
        dsp.threshold_row(name, threshold, x_BxK.shape[1])


def _kept(x_f32: jax.Array, t_f32: jax.Array | None, dtype: Any) -> jax.Array:
    """x (float32, from `dtype`) with the entries below the threshold zeroed (abs(x) < t
    -> 0), t rounded to `dtype` first: the entries `abs(x) >= t` keeps in `dtype`."""
    if t_f32 is None:
        return x_f32
    t = t_f32.astype(dtype).astype(jnp.float32)
    return jnp.where(jnp.abs(x_f32) >= t, x_f32, 0.0)


# ----------------------------------------------------------------------- reference


def sparse_input_matvec_reference(
    x_BxK: jax.Array,
    w_KxN: jax.Array,
    threshold: Any = None,
    *,
    block_k: int | None = None,
    block_n: int | None = None,
    out_dtype: Any = None,
) -> jax.Array:
    """`(x * (abs(x) >= t)) @ W` in float32, returned in `out_dtype` (default x.dtype;
    block sizes unused)."""
    del block_k, block_n
    _check(x_BxK, w_KxN, threshold)
    t = None if threshold is None else dsp.threshold_row(_NAME, threshold, x_BxK.shape[1])
    xk = _kept(x_BxK.astype(jnp.float32), t, x_BxK.dtype)
    y = jnp.dot(xk, w_KxN.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return y.astype(x_BxK.dtype if out_dtype is None else out_dtype)


# ------------------------------------------------------------------------ GPU (Triton)


def _gpu_kernel(*refs, N, col=0, **tile):
    """One program: the (block_k x block_n) tiles of its K split, for one column block
    (`tile`: the keyword arguments of `_tile`).

    `dot_dtype` None: batch rows one by one (multiply + sum over the tile: B = 1); else
    the [B, block_k] x tile (B padded to 16+ rows) times the W tile on the tensor cores.
    Either way a W row is loaded only when some batch row's x is nonzero there (the union
    of active rows), with an evict-first hint (each W byte is read once) while x is
    evict-last (every column block reads it). With `unroll` the loop over the program's
    tiles is unrolled: the tiles' loads do not wait on each other, and a program covering
    several tiles issues a quarter (with 4) of the atomics. The atomics add into columns
    `col + n0 ...` of the float32 target: a shared accumulator holds several calls'
    outputs side by side (`sparse_input_matvec_into`).
    """
    if tile["has_t"]:
        x_ref, t_ref, w_ref, *rest = refs
    else:
        x_ref, w_ref, *rest = refs
        t_ref = None
    y_ref = rest[-1]  # with atomics, rest = (zeros_in, y_out) aliased
    n, s, rows = pl.program_id(0), pl.program_id(1), dsp.static_indices(tile["B"])
    _tile(x_ref, t_ref, w_ref, y_ref, n, s, rows, N=N, col=col, **tile)


def _gpu_pair_kernel(*refs, parts, **tile):
    """Several products in one launch: `refs` = (x_1, w_1, ..., x_P, w_P, zeros_in, y_out);
    `parts` = ((N_p, first column block, number of column blocks, col_p), ...). Each
    program finds the product its column block belongs to and runs `_tile` for it, adding
    into columns `col_p ...` of the shared float32 target."""
    y_ref = refs[-1]
    # read outside the branches (the interpreter resolves program ids at the top level)
    n, s, rows = pl.program_id(0), pl.program_id(1), dsp.static_indices(tile["B"])
    for p, (N, first, count, col) in enumerate(parts):
        x_ref, w_ref = refs[2 * p], refs[2 * p + 1]
        inside = n >= first if p == len(parts) - 1 else (n >= first) & (n < first + count)

        @pl.when(inside)
        def _(x_ref=x_ref, w_ref=w_ref, N=N, first=first, col=col):
            _tile(x_ref, None, w_ref, y_ref, n - first, s, rows, N=N, col=col, **tile)


def _tile(
    x_ref,
    t_ref,
    w_ref,
    y_ref,
    n,
    s,
    rows,
    *,
    B,
    K,
    N,
    block_k,
    block_n,
    blocks_per_split,
    has_t,
    atomic,
    dot_dtype,
    k_exact,
    unroll,
    col,
):
    """The work of one program (`_gpu_kernel`): column block `n`, K split `s`; `rows`
    are the batch row indices (`dsp.static_indices(B)`)."""
    n0 = n * block_n
    col_ok = None if N % block_n == 0 else (n0 + jnp.arange(block_n)) < N

    def w_tile(k0, active):
        mask = active[:, None]
        if col_ok is not None:
            mask = mask & col_ok[None, :]
        mask = jnp.broadcast_to(mask, (block_k, block_n))
        w_view = w_ref.at[pl.ds(k0, block_k), pl.ds(n0, block_n)]
        return dsp.masked_load(w_view, mask, 0.0, eviction="evict_first")

    def x_and_t(k0, k_ok, x_view, shape):
        ok = None if k_ok is None else jnp.broadcast_to(k_ok, shape)  # [block_k] -> shape
        x = dsp.masked_load(x_view, ok, 0.0, eviction="evict_last").astype(jnp.float32)
        if has_t:
            t = dsp.masked_load(t_ref.at[rows[0], pl.ds(k0, block_k)], k_ok, 0.0)
            x = _kept(x, t.astype(jnp.float32), x_view.dtype)
        return x

    def k_start(j):
        k0 = (s * blocks_per_split + j) * block_k
        return k0, None if k_exact else (k0 + jnp.arange(block_k)) < K

    if dot_dtype is None:

        def body(j, accs):
            k0, k_ok = k_start(j)
            xs = [
                x_and_t(k0, k_ok, x_ref.at[rows[b], pl.ds(k0, block_k)], (block_k,))
                for b in range(B)
            ]
            active = xs[0] != 0.0
            for xb in xs[1:]:
                active = active | (xb != 0.0)
            w = w_tile(k0, active).astype(jnp.float32)
            return tuple(acc + jnp.sum(xb[:, None] * w, axis=0) for acc, xb in zip(accs, xs))

        init = tuple(jnp.zeros((block_n,), jnp.float32) for _ in range(B))
        accs = _loop(blocks_per_split, body, init, unroll)
        for b in range(B):
            if atomic:
                dsp.atomic_add(y_ref, (rows[b], pl.ds(col + n0, block_n)), accs[b])
            else:
                dsp.masked_store(
                    y_ref.at[rows[b], pl.ds(n0, block_n)], accs[b].astype(y_ref.dtype), col_ok
                )
        return

    def body_dot(j, acc):
        k0, k_ok = k_start(j)
        x_view = x_ref.at[pl.ds(0, B), pl.ds(k0, block_k)]
        x = x_and_t(k0, k_ok, x_view, (B, block_k))
        active = jnp.sum(jnp.abs(x), axis=0) > 0.0
        w = w_tile(k0, active).astype(dot_dtype)
        return acc + dsp.triton_dot(x.astype(dot_dtype), w)

    acc = _loop(blocks_per_split, body_dot, jnp.zeros((B, block_n), jnp.float32), unroll)
    if atomic:
        dsp.atomic_add(y_ref, (pl.ds(0, B), pl.ds(col + n0, block_n)), acc)
    else:
        dsp.masked_store(
            y_ref.at[pl.ds(0, B), pl.ds(n0, block_n)],
            acc.astype(y_ref.dtype),
            None if col_ok is None else jnp.broadcast_to(col_ok[None, :], (B, block_n)),
        )


def _loop(n: int, body, init, unroll: bool):
    """`fori_loop(0, n, body, init)`, or the n steps written out one after the other (the
    Triton lowering has no unrolled loop; a Python loop gives the same straight-line code)."""
    if not unroll:
        return jax.lax.fori_loop(0, n, body, init)
    out = init
    for j in range(n):
        out = body(j, out)
    return out


def _auto_split(n_k_blocks: int) -> int:
    """One tile per program: the programs' loads are all independent and in flight at
    once. A loop over K blocks inside a program was slower on the H100: each step's W
    load waits on its x load (the row mask), which serializes the latencies."""
    return n_k_blocks


DOT_MIN_ROWS = 16  # the tensor-core path pads the batch to at least this many rows


def _uses_dot(B: int, dot: bool | None) -> bool:
    return B >= 2 if dot is None else bool(dot)


def _target_rows(B: int, use_dot: bool) -> int:
    """Rows of the kernel's float32 target: B, or B padded to a tensor-core tile."""
    return max(DOT_MIN_ROWS, 1 << (B - 1).bit_length()) if use_dot else B


def accumulator_shape(
    B: int, N: int, *, block_n: int = DEFAULT_BLOCK_N, dot: bool | None = None
) -> tuple[int, int]:
    """(rows, columns) that one GPU `sparse_input_matvec_into` call of a [B, K] x [K, N]
    product needs in its accumulator: B (or B padded to 16+ rows on the tensor-core
    path, the default from batch 2 on), and N rounded up to whole column blocks (the
    kernel adds zeros past N, so no atomic needs a mask)."""
    return _target_rows(B, _uses_dot(B, dot)), dsp.cdiv(N, block_n) * block_n


def _gpu_plan(
    B, K, block_k, block_n, split_k, dot, unroll=None, dtypes=(jnp.float32, jnp.float32)
) -> tuple[int, int, dict]:
    """(rows of the float32 target, K splits, the `_tile` arguments that follow from
    them) of a GPU launch for a [B, K] input, after checking the block sizes. `dtypes`:
    x's and W's, for the tensor-core input dtype."""
    dsp.check_block(_NAME, "block_k", block_k, power_of_2=True)
    dsp.check_block(_NAME, "block_n", block_n, power_of_2=True)
    use_dot = _uses_dot(B, dot)
    if use_dot and min(block_k, block_n) < DOT_MIN_ROWS:
        raise ValueError(
            f"{_NAME}: the tensor-core path (dot=True, the default for batch >= 2) needs "
            f"block_k and block_n >= {DOT_MIN_ROWS}, got {block_k} x {block_n}."
        )
    n_kb = dsp.cdiv(K, block_k)
    split = _auto_split(n_kb) if split_k is None else max(1, min(split_k, n_kb))
    blocks_per_split = dsp.cdiv(n_kb, split)
    split = dsp.cdiv(n_kb, blocks_per_split)  # drop splits that would have no rows
    rows = _target_rows(B, use_dot)
    tile = {
        "B": rows,
        "K": K,
        "block_k": block_k,
        "block_n": block_n,
        "blocks_per_split": blocks_per_split,
        "dot_dtype": _dot_dtype(*dtypes) if use_dot else None,
        "k_exact": K % block_k == 0 and n_kb == split * blocks_per_split,
        # unrolled up to 8 tiles per program (None); a longer loop stays a loop
        "unroll": blocks_per_split <= 8 if unroll is None else bool(unroll),
    }
    return rows, split, tile


def adds_into_zeros(K: int, *, block_k: int = DEFAULT_BLOCK_K, split_k: int | None = None) -> bool:
    """Whether the GPU kernel splits K over several programs, which then add into a
    zeroed float32 target (a zero-fill before the kernel); with one split it stores y."""
    return _gpu_plan(1, K, block_k, DEFAULT_BLOCK_N, split_k, False)[1] > 1


def _check_acc(acc: Any, rows: int, col: int, span: int, N: int, block_n: int) -> None:
    if not isinstance(col, int) or col < 0:
        raise ValueError(f"{_NAME}_into: col={col!r} must be a non-negative int.")
    if getattr(acc, "ndim", None) != 2 or jnp.dtype(acc.dtype) != jnp.float32:
        raise ValueError(
            f"{_NAME}_into: acc must be a float32 [rows, columns] array, got "
            f"{getattr(acc, 'dtype', type(acc))} {getattr(acc, 'shape', '')}."
        )
    if acc.shape[0] < rows or acc.shape[1] < col + span:
        raise ValueError(
            f"{_NAME}_into: acc {tuple(acc.shape)} is too small: the GPU kernel adds rows "
            f"[0, {rows}) and columns [{col}, {col + span}) (N={N} rounded up to whole "
            f"blocks of {block_n}); size it with accumulator_shape()."
        )


def _dot_dtype(x_dtype: Any, w_dtype: Any) -> Any:
    """The tensor-core input dtype: the shared half-precision dtype, else float32."""
    if jnp.dtype(x_dtype) == jnp.dtype(w_dtype) and jnp.dtype(w_dtype) != jnp.float32:
        return jnp.dtype(w_dtype)
    return jnp.dtype(jnp.float32)


@functools.partial(
    jax.jit,
    static_argnames=(
        "block_k",
        "block_n",
        "split_k",
        "num_warps",
        "num_stages",
        "interpret",
        "dot",
        "out_dtype",
        "unroll",
        "col",
    ),
)
def _sparse_input_matvec_gpu(
    x_BxK: jax.Array,
    w_KxN: jax.Array,
    threshold: Any = None,
    *,
    acc: jax.Array | None = None,
    col: int = 0,
    block_k: int = DEFAULT_BLOCK_K,
    block_n: int = DEFAULT_BLOCK_N,
    split_k: int | None = None,
    num_warps: int | None = DEFAULT_NUM_WARPS,
    num_stages: int | None = 3,
    interpret: bool = False,
    dot: bool | None = None,
    out_dtype: Any = None,
    unroll: bool | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """The GPU kernel; with `acc` (`sparse_input_matvec_into`) it adds into `acc`'s columns
    from `col` on and returns (those columns' sums for the B rows, the updated `acc`)."""
    B, K = x_BxK.shape
    N = w_KxN.shape[1]
    out_dtype = jnp.dtype(x_BxK.dtype if out_dtype is None else out_dtype)
    dtypes = (x_BxK.dtype, w_KxN.dtype)
    rows, split, tile = _gpu_plan(B, K, block_k, block_n, split_k, dot, unroll, dtypes)
    n_col = dsp.cdiv(N, block_n)
    atomic = split > 1 or acc is not None
    has_t = threshold is not None
    x_in = x_BxK
    if rows != B:  # pad the batch to a tensor-core tile (a power of 2, at least 16 rows)
        x_in = jnp.pad(x_BxK, ((0, rows - B), (0, 0)))
    if acc is not None:
        _check_acc(acc, rows, col, n_col * block_n, N, block_n)

    args = [x_in]
    if has_t:
        args.append(dsp.threshold_row(_NAME, threshold, K))
    args.append(w_KxN)
    kernel = functools.partial(
        _gpu_kernel,
        N=N,
        has_t=has_t,
        atomic=atomic,
        col=col if acc is not None else 0,
        **tile,
    )
    params = dsp.triton_compiler_params(num_warps, num_stages)
    if atomic:
        # The atomic target is padded to whole column blocks so that no atomic needs a
        # mask (masked atomics have no interpret-mode rule in jax 0.10). It is float32:
        # with out_dtype float32 (what the models ask for) it is returned as it is, with
        # no cast pass after the kernel.
        target = jnp.zeros((rows, n_col * block_n), jnp.float32) if acc is None else acc
        args.append(target)
        y = pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct(target.shape, jnp.float32),
            grid=(n_col, split),
            input_output_aliases={len(args) - 1: 0},
            compiler_params=params,
            interpret=interpret,
            name="sparse_input_matvec_splitk",
        )(*args)
        if acc is not None:
            return y[:B, col : col + N], y
    else:
        y = pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct((rows, N), out_dtype),
            grid=(n_col, 1),
            compiler_params=params,
            interpret=interpret,
            name="sparse_input_matvec",
        )(*args)
    if y.shape != (B, N):
        y = y[:B, :N]
    return y if y.dtype == out_dtype else y.astype(out_dtype)


# ------------------------------------------------------------------------ TPU (Mosaic)

# VMEM for the two row buffers of one program (2 x block_k x block_n elements of W); a
# column block is narrowed (a multiple of 128 dividing N) until they fit. The scoped VMEM
# limit is 16 MiB on v5e, 32 MiB on v6e.
_TPU_BUFFER_BYTES = 4 * 2**20
TPU_BLOCK_K = 128  # compacted rows per chunk: one MXU-aligned contraction


def tpu_block_n(n: int, block_k: int, itemsize: int) -> int:
    """The widest column block for the TPU kernel: N itself when its two row buffers fit
    `_TPU_BUFFER_BYTES`, else the widest multiple of 128 dividing N that fits (N itself
    when no multiple of 128 divides N)."""
    if 2 * block_k * n * itemsize <= _TPU_BUFFER_BYTES:
        return n
    fits = [b for b in range(128, n, 128) if n % b == 0]
    fits = [b for b in fits if 2 * block_k * b * itemsize <= _TPU_BUFFER_BYTES] or fits[:1]
    return max(fits) if fits else n


def _tpu_kernel(
    ids_ref, cnt_ref, xc_ref, w_hbm, y_ref, *rest, block_k, block_n, dot_dtype, count_copies
):
    if count_copies:
        copied_ref, wbuf, sems, acc_ref = rest
    else:
        copied_ref = None
        wbuf, sems, acc_ref = rest
    n = pl.program_id(0)
    col0 = pl.multiple_of(n * block_n, block_n)
    count = cnt_ref[0]
    acc_ref[...] = jnp.zeros_like(acc_ref)
    counter = None
    if copied_ref is not None:
        copied_ref[n] = 0
        counter = (copied_ref, n)

    def w_row(k):
        return w_hbm.at[pl.ds(k, 1), pl.ds(col0, block_n)]

    def chunk(c, slot):
        ok = rdma.chunk_row_valid(c, count, block_k, axis=0)
        w = jnp.where(ok, wbuf[slot], 0).astype(dot_dtype)  # stale rows past the count
        x = xc_ref[c].astype(dot_dtype)  # [B, block_k], zero past the count
        acc_ref[...] += jnp.dot(
            x,
            w,
            preferred_element_type=jnp.float32,
            precision=jax.lax.Precision.HIGHEST if dot_dtype == jnp.float32 else None,
        )

    rdma.for_each_chunk(ids_ref, count, block_k, [(w_row, wbuf)], sems, chunk, counter)
    y_ref[...] = acc_ref[...].astype(y_ref.dtype)


@functools.partial(
    jax.jit, static_argnames=("block_k", "block_n", "interpret", "count_copies", "out_dtype")
)
def _sparse_input_matvec_tpu(
    x_BxK: jax.Array,
    w_KxN: jax.Array,
    threshold: Any = None,
    *,
    block_k: int = TPU_BLOCK_K,
    block_n: int | None = None,
    interpret: bool = False,
    count_copies: bool = False,
    out_dtype: Any = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """The TPU kernel. With `count_copies` (a debug mode) it also returns the number of
    row DMAs each column block started, int32 [n_col]."""
    B, K = x_BxK.shape
    N = w_KxN.shape[1]
    sub = rdma.sublane_rows(w_KxN.dtype)
    if not isinstance(block_k, int) or block_k <= 0 or block_k % sub:
        raise ValueError(
            f"{_NAME}: block_k={block_k!r} (rows per chunk) must be a positive multiple of "
            f"{sub}, the sublane tile of {w_KxN.dtype}, for the TPU kernel."
        )
    if block_n is None:
        block_n = tpu_block_n(N, block_k, w_KxN.dtype.itemsize)
    elif block_n != N and (block_n % 128 or N % block_n):
        raise ValueError(
            f"{_NAME}: block_n={block_n} must equal N={N} or be a multiple of 128 that "
            "divides N for the TPU kernel (its row copies may not run past the end)."
        )
    t_1xK = dsp.threshold_row(_NAME, threshold, K) if threshold is not None else None
    xk = _kept(x_BxK.astype(jnp.float32), t_1xK, x_BxK.dtype)
    ids, cnt = rdma.compact_rows(jnp.any(xk != 0.0, axis=0), block_k)
    xc = rdma.compact_columns(xk, ids, cnt, block_k)  # [n_chunks, B, block_k] float32
    n_col = N // block_n
    same = x_BxK.dtype == w_KxN.dtype and x_BxK.dtype != jnp.float16
    dot_dtype = jnp.dtype(x_BxK.dtype if same else jnp.float32)
    kernel = functools.partial(
        _tpu_kernel,
        block_k=block_k,
        block_n=block_n,
        dot_dtype=dot_dtype,
        count_copies=count_copies,
    )
    out_specs = [pl.BlockSpec((B, block_n), lambda n, ids, cnt: (0, n))]
    out_shape = [jax.ShapeDtypeStruct((B, N), x_BxK.dtype if out_dtype is None else out_dtype)]
    if count_copies:
        out_specs.append(rdma.smem_spec())
        out_shape.append(jax.ShapeDtypeStruct((n_col,), jnp.int32))
    grid_spec = dsp.prefetch_grid_spec(
        num_scalar_prefetch=2,
        grid=(n_col,),
        in_specs=[
            pl.BlockSpec(xc.shape, lambda n, ids, cnt: (0, 0, 0)),
            rdma.any_spec(),
        ],
        out_specs=out_specs,
        scratch_shapes=[
            dsp.vmem((2, block_k, block_n), w_KxN.dtype),
            rdma.dma_semaphores(2),
            dsp.vmem((B, block_n), jnp.float32),
        ],
    )
    out = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid_spec=grid_spec,
        # Column blocks are independent ("parallel": split over TensorCores); the debug
        # counter is one SMEM array for the whole grid, so it runs them in order.
        compiler_params=dsp.tpu_compiler_params(("arbitrary" if count_copies else "parallel",)),
        interpret=dsp.tpu_interpret_params() if interpret else False,
        name="sparse_input_matvec_tpu",
    )(ids, cnt, xc, w_KxN)
    return tuple(out) if count_copies else out[0]


# ------------------------------------------------------------------------ dispatcher


def _given_blocks(block_k: int | None, block_n: int | None) -> dict:
    """The block sizes the caller gave (None: the kernel's default), as keyword arguments."""
    return {k: v for k, v in (("block_k", block_k), ("block_n", block_n)) if v is not None}


def sparse_input_matvec(
    x_BxK: jax.Array,
    w_KxN: jax.Array,
    threshold: Any = None,
    *,
    impl: str = "auto",
    block_k: int | None = None,
    block_n: int | None = None,
    out_dtype: Any = None,
    **kernel_options: Any,
) -> jax.Array:
    """`y[B, N] = (x * (abs(x) >= t)) @ W`, reading only the rows of W still in use.

    Args:
      x_BxK: activations [B, K] (float32/bfloat16).
      w_KxN: weight [K, N], input channels as rows (the transpose of torch's Linear).
      threshold: None (skip exact zeros), a scalar, or [K] per-channel thresholds;
        entries with abs(x) < t are zeroed, t rounded to x's dtype (as
        `jaxsparse.rules.sparsify` compares).
      impl: "auto" (by backend: gpu, tpu, else reference), "reference", "gpu", "tpu",
        "gpu_interpret", "tpu_interpret".
      block_k, block_n: tile sizes (powers of 2 on GPU); None picks the kernel default.
      out_dtype: the dtype of y (default x.dtype). float32 returns the accumulator
        itself: on GPU that saves the cast pass after the split-K kernel.
      kernel_options: GPU only: split_k, num_warps, num_stages, `dot` (True: the
        batch rows as one tensor-core tile, padded to 16; the default from batch 2 on) and
        `unroll` (unroll each program's loop over its tiles; default when it has <= 8).

    Returns:
      y [B, N] in `out_dtype`, accumulated in float32.
    """
    if out_dtype is not None and jnp.dtype(out_dtype) not in dsp.FLOAT_DTYPES:
        raise ValueError(
            f"{_NAME}: out_dtype={out_dtype!r}; use float32, bfloat16 or float16 (or None "
            "for x's dtype)."
        )
    which = dsp.resolve_impl(impl, fn_name=_NAME)
    _check(x_BxK, w_KxN, threshold)
    blocks = _given_blocks(block_k, block_n)
    out = None if out_dtype is None else jnp.dtype(out_dtype)
    if which == "reference":
        return sparse_input_matvec_reference(x_BxK, w_KxN, threshold, out_dtype=out)
    if which in ("gpu", "gpu_interpret"):
        return _sparse_input_matvec_gpu(
            x_BxK,
            w_KxN,
            threshold,
            interpret=which == "gpu_interpret",
            out_dtype=out,
            **blocks,
            **kernel_options,
        )
    if kernel_options:
        raise ValueError(f"{_NAME}: options {sorted(kernel_options)} apply to the GPU kernel only.")
    return _sparse_input_matvec_tpu(
        x_BxK, w_KxN, threshold, interpret=which == "tpu_interpret", out_dtype=out, **blocks
    )


def sparse_input_matvec_into(
    acc: jax.Array,
    col: int,
    x_BxK: jax.Array,
    w_KxN: jax.Array,
    threshold: Any = None,
    *,
    impl: str = "auto",
    block_k: int | None = None,
    block_n: int | None = None,
    **kernel_options: Any,
) -> tuple[jax.Array, jax.Array]:
    """Adds `(x * (abs(x) >= t)) @ W` into columns `[col, col + N)` of a float32 accumulator.

    On GPU the split-K kernel adds into `acc` in place (the call's output aliases it), so
    several matvecs that share one zeroed accumulator, each in its own columns, need one
    zero-fill between them instead of one each (a decode block's projections:
    `jaxsparse.models.layers.SharedAccumulator`). Elsewhere the product is computed as by
    `sparse_input_matvec` and added.

    Args:
      acc: float32 [rows, columns]; on GPU at least `accumulator_shape(B, N)` past `col`
        (rows: B, or 16+ on the tensor-core path; columns: N rounded up to whole column
        blocks, where the kernel adds zeros).
      col: the first column of this product in `acc` (a Python int).
      x_BxK, w_KxN, threshold, impl, block_k, block_n, kernel_options: as for
        `sparse_input_matvec`.

    Returns:
      (y, acc'): `acc'[:B, col:col + N]` (float32 [B, N]: the product plus what `acc` held
      there) and the updated accumulator. Pass `acc'` on; `acc` itself may have been
      overwritten.
    """
    which = dsp.resolve_impl(impl, fn_name=f"{_NAME}_into")
    _check(x_BxK, w_KxN, threshold)
    B, N = x_BxK.shape[0], w_KxN.shape[1]
    if which in ("gpu", "gpu_interpret"):
        blocks = _given_blocks(block_k, block_n)
        return _sparse_input_matvec_gpu(
            x_BxK,
            w_KxN,
            threshold,
            acc=acc,
            col=col,
            interpret=which == "gpu_interpret",
            out_dtype=jnp.float32,
            **blocks,
            **kernel_options,
        )
    _check_acc(acc, B, col, N, N, N)
    y = sparse_input_matvec(
        x_BxK,
        w_KxN,
        threshold,
        impl=which,
        block_k=block_k,
        block_n=block_n,
        out_dtype=jnp.float32,
        **kernel_options,
    )
    acc = jax.lax.dynamic_update_slice(acc, acc[:B, col : col + N] + y, (0, col))
    return acc[:B, col : col + N], acc


@functools.partial(
    jax.jit,
    static_argnames=(
        "col",
        "block_k",
        "block_n",
        "split_k",
        "num_warps",
        "num_stages",
        "interpret",
        "dot",
        "unroll",
    ),
)
def _sparse_input_matvecs_gpu(
    acc: jax.Array,
    xs: tuple[jax.Array, ...],
    ws: tuple[jax.Array, ...],
    *,
    col: int,
    block_k: int = DEFAULT_BLOCK_K,
    block_n: int = DEFAULT_BLOCK_N,
    split_k: int | None = None,
    num_warps: int | None = DEFAULT_NUM_WARPS,
    num_stages: int | None = 3,
    interpret: bool = False,
    dot: bool | None = None,
    unroll: bool | None = None,
) -> tuple[list[jax.Array], jax.Array]:
    """Several split-K products in one launch (`sparse_input_matvecs_into` on GPU)."""
    B, K = xs[0].shape
    dtypes = (xs[0].dtype, ws[0].dtype)
    rows, split, tile = _gpu_plan(B, K, block_k, block_n, split_k, dot, unroll, dtypes)
    parts, first, c = [], 0, col
    for w in ws:
        count = dsp.cdiv(w.shape[1], block_n)
        parts.append((w.shape[1], first, count, c))
        first, c = first + count, c + count * block_n
    _check_acc(acc, rows, col, c - col, sum(w.shape[1] for w in ws), block_n)
    kernel = functools.partial(
        _gpu_pair_kernel, parts=tuple(parts), has_t=False, atomic=True, **tile
    )
    args = []
    for x, w in zip(xs, ws):
        args += [x if rows == B else jnp.pad(x, ((0, rows - B), (0, 0))), w]
    args.append(acc)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(acc.shape, jnp.float32),
        grid=(first, split),
        input_output_aliases={len(args) - 1: 0},
        compiler_params=dsp.triton_compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="sparse_input_matvecs_splitk",
    )(*args)
    return [out[:B, c0 : c0 + N] for N, _, _, c0 in parts], out


def sparse_input_matvecs_into(
    acc: jax.Array,
    col: int,
    pairs: list[tuple[jax.Array, jax.Array]],
    *,
    impl: str = "auto",
    block_k: int | None = None,
    block_n: int | None = None,
    **kernel_options: Any,
) -> tuple[list[jax.Array], jax.Array]:
    """Several sparse-input products `x_p @ W_p`, one input each and one K, added side by
    side into a float32 accumulator from column `col` on: on GPU in one kernel launch.

    A launch costs a few µs whatever its size (benchmarks/NOTES_kernels.md), so products
    that read different inputs but can run together (CHESS+'s q, whose input has its own
    threshold, and k|v) save one by sharing it. Each product takes whole column blocks
    (`accumulator_shape(B, N_p)[1]` columns, in order); a program works on one product's
    block. Elsewhere the products run one after the other (`sparse_input_matvec_into`).

    Args:
      acc: float32 [rows, columns] with room for every product's columns past `col`.
      col: the first column of the first product (a Python int).
      pairs: [(x_p [B, K], W_p [K, N_p]), ...]: the same B, K and dtypes throughout; no
        threshold (apply it to x first).
      impl, block_k, block_n, kernel_options: as for `sparse_input_matvec` (GPU options:
        split_k, num_warps, num_stages, dot, unroll).

    Returns:
      ([y_p float32 [B, N_p], ...], acc'): each product plus what `acc` held in its
      columns, and the updated accumulator (pass it on).
    """
    which = dsp.resolve_impl(impl, fn_name=f"{_NAME}s_into")
    if not pairs:
        raise ValueError(f"{_NAME}s_into: pairs is empty; give at least one (x, W).")
    x0, w0 = pairs[0]
    for i, (x, w) in enumerate(pairs):
        _check(x, w, None)
        if x.shape != x0.shape or x.dtype != x0.dtype or w.dtype != w0.dtype:
            raise ValueError(
                f"{_NAME}s_into: pair {i} has x {x.dtype}{tuple(x.shape)} and W {w.dtype}, "
                f"pair 0 x {x0.dtype}{tuple(x0.shape)} and W {w0.dtype}: every pair needs "
                "the same x shape and dtypes."
            )
    if which in ("gpu", "gpu_interpret"):
        blocks = _given_blocks(block_k, block_n)
        return _sparse_input_matvecs_gpu(
            acc,
            tuple(x for x, _ in pairs),
            tuple(w for _, w in pairs),
            col=col,
            interpret=which == "gpu_interpret",
            **blocks,
            **kernel_options,
        )
    ys, c = [], col
    bn = block_n or DEFAULT_BLOCK_N
    for x, w in pairs:
        y, acc = sparse_input_matvec_into(
            acc, c, x, w, impl=which, block_k=block_k, block_n=block_n, **kernel_options
        )
        ys.append(y)
        c += accumulator_shape(x.shape[0], w.shape[1], block_n=bn)[1]
    return ys, acc
