"""Sparse-input matvec: `y[B, N] = x[B, K] @ W[K, N]` reading only the rows of W in use.

Row `k` of `W` is read only when some `x[b, k]` survives: `x[b, k] != 0`, or, with a
fused `threshold` t (a scalar, or one per input channel `[K]`), `abs(x[b, k]) >= t`;
entries with `abs(x) < t` are zeroed, as everywhere in jaxsparse. W is stored `[K, N]`
so that each input channel's row is contiguous. Used for down_proj, o_proj, q_proj and
every TEAL projection.

Holds:
- `sparse_input_matvec_reference`: pure jnp, float32 accumulation, returns x.dtype.
- `_sparse_input_matvec_gpu`: Pallas on the Triton lowering (TEAL's design). Grid
  (N blocks x K splits); each program walks its range of K blocks, builds the row mask
  from x, loads only the active rows of its W tile with a masked load (masked-out rows
  cost no memory traffic) and reduces in float32. With one K split
  (`split_k=1`) it stores y directly in x.dtype: one launch, no zero-fill, no atomics.
  With several splits (the default: one (block_k x block_n) tile per program, as in
  TEAL) it adds into a zeroed float32 buffer with atomics (split-K) and casts after.
- `_sparse_input_matvec_tpu`: Pallas on Mosaic TPU with scalar prefetch. The list of
  K blocks holding an active row (and its length) is computed outside the kernel and
  prefetched; the index maps read it, so only active blocks of W are DMA'd. Trailing
  grid steps repeat the last active block (no new DMA) and are skipped with `pl.when`.
- `sparse_input_matvec`: the dispatcher (by `jax.default_backend()`, or `impl=`).

Leaves out: compacting active rows before the kernel (one extra pass and launch; the
masked load already skips the bytes), quantized weights, and batch sizes where a dense
matmul wins (the union of active rows grows with B; the dispatcher does not switch).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _dispatch as dsp

_NAME = "sparse_input_matvec"

# Defaults from the H100 sweep (benchmarks/results/kernels_h100.json, NOTES_kernels.md):
# 128 x 64 tiles, one tile per program (TEAL's layout) was fastest on 4096x14336,
# 14336x4096 and (tied with 128x128) 4096x4096; on 4096x1024 all configs were within noise.
DEFAULT_BLOCK_K = 128
DEFAULT_BLOCK_N = 64


def _check(x_BxK: jax.Array, w_KxN: jax.Array, threshold: Any) -> None:
    dsp.check_ndim(_NAME, "x_BxK", x_BxK, 2, "[B, K]")
    dsp.check_ndim(_NAME, "w_KxN", w_KxN, 2, "[K, N]")
    dsp.check_float(_NAME, "x_BxK", x_BxK)
    dsp.check_float(_NAME, "w_KxN", w_KxN)
    dsp.check_dim(_NAME, "w_KxN.shape[0] (K)", w_KxN.shape[0], x_BxK.shape[1])
    if threshold is not None:
        dsp.threshold_row(_NAME, threshold, x_BxK.shape[1])


def _kept(x_f32: jax.Array, t_f32: jax.Array | None) -> jax.Array:
    """x with the entries below the threshold zeroed (abs(x) < t -> 0)."""
    if t_f32 is None:
        return x_f32
    return jnp.where(jnp.abs(x_f32) >= t_f32, x_f32, 0.0)


# ----------------------------------------------------------------------- reference


def sparse_input_matvec_reference(
    x_BxK: jax.Array,
    w_KxN: jax.Array,
    threshold: Any = None,
    *,
    block_k: int | None = None,
    block_n: int | None = None,
) -> jax.Array:
    """`(x * (abs(x) >= t)) @ W` in float32, returned in x.dtype (block sizes unused)."""
    del block_k, block_n
    _check(x_BxK, w_KxN, threshold)
    t = None if threshold is None else dsp.threshold_row(_NAME, threshold, x_BxK.shape[1])
    xk = _kept(x_BxK.astype(jnp.float32), t)
    y = jnp.dot(xk, w_KxN.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return y.astype(x_BxK.dtype)


# ------------------------------------------------------------------------ GPU (Triton)


def _gpu_kernel(*refs, B, K, N, block_k, block_n, blocks_per_split, has_t, atomic):
    if has_t:
        x_ref, t_ref, w_ref, *rest = refs
    else:
        x_ref, w_ref, *rest = refs
        t_ref = None
    y_ref = rest[-1]  # with atomics, rest = (zeros_in, y_out) aliased
    n = pl.program_id(0)
    s = pl.program_id(1)
    rows = dsp.static_indices(B)
    n0 = n * block_n
    col_ok = (n0 + jnp.arange(block_n)) < N

    def body(j, accs):
        k0 = (s * blocks_per_split + j) * block_k
        k_ok = (k0 + jnp.arange(block_k)) < K
        t = None
        if has_t:
            t = dsp.masked_load(t_ref.at[rows[0], pl.ds(k0, block_k)], k_ok, 0.0)
        xs = []
        active = None
        for b in range(B):
            xb = dsp.masked_load(x_ref.at[rows[b], pl.ds(k0, block_k)], k_ok, 0.0)
            xb = _kept(xb.astype(jnp.float32), t)
            xs.append(xb)
            nz = xb != 0.0
            active = nz if active is None else (active | nz)
        mask = active[:, None] & col_ok[None, :]
        w = dsp.masked_load(w_ref.at[pl.ds(k0, block_k), pl.ds(n0, block_n)], mask, 0.0).astype(
            jnp.float32
        )
        return tuple(acc + jnp.sum(xb[:, None] * w, axis=0) for acc, xb in zip(accs, xs))

    init = tuple(jnp.zeros((block_n,), jnp.float32) for _ in range(B))
    accs = jax.lax.fori_loop(0, blocks_per_split, body, init)
    for b in range(B):
        if atomic:
            dsp.atomic_add(y_ref, (rows[b], pl.ds(n0, block_n)), accs[b])
        else:
            dsp.masked_store(
                y_ref.at[rows[b], pl.ds(n0, block_n)], accs[b].astype(y_ref.dtype), col_ok
            )


def _auto_split(n_col_blocks: int, n_k_blocks: int) -> int:
    """One tile per program: the programs' loads are all independent and in flight at
    once. A loop over K blocks inside a program was slower on the H100: each step's W
    load waits on its x load (the row mask), which serializes the latencies."""
    del n_col_blocks
    return n_k_blocks


@functools.partial(
    jax.jit,
    static_argnames=(
        "block_k",
        "block_n",
        "split_k",
        "num_warps",
        "num_stages",
        "interpret",
    ),
)
def _sparse_input_matvec_gpu(
    x_BxK: jax.Array,
    w_KxN: jax.Array,
    threshold: Any = None,
    *,
    block_k: int = DEFAULT_BLOCK_K,
    block_n: int = DEFAULT_BLOCK_N,
    split_k: int | None = None,
    num_warps: int | None = 4,
    num_stages: int | None = 3,
    interpret: bool = False,
) -> jax.Array:
    B, K = x_BxK.shape
    N = w_KxN.shape[1]
    dsp.check_block(_NAME, "block_k", block_k, power_of_2=True)
    dsp.check_block(_NAME, "block_n", block_n, power_of_2=True)
    n_col = dsp.cdiv(N, block_n)
    n_kb = dsp.cdiv(K, block_k)
    split = _auto_split(n_col, n_kb) if split_k is None else max(1, min(split_k, n_kb))
    blocks_per_split = dsp.cdiv(n_kb, split)
    split = dsp.cdiv(n_kb, blocks_per_split)  # drop splits that would have no rows
    atomic = split > 1
    has_t = threshold is not None

    args = [x_BxK]
    if has_t:
        args.append(dsp.threshold_row(_NAME, threshold, K))
    args.append(w_KxN)
    kernel = functools.partial(
        _gpu_kernel,
        B=B,
        K=K,
        N=N,
        block_k=block_k,
        block_n=block_n,
        blocks_per_split=blocks_per_split,
        has_t=has_t,
        atomic=atomic,
    )
    params = dsp.triton_compiler_params(num_warps, num_stages)
    if atomic:
        # The atomic target is padded to whole column blocks so that no atomic needs a
        # mask (masked atomics have no interpret-mode rule in jax 0.10).
        zeros = jnp.zeros((B, n_col * block_n), jnp.float32)
        args.append(zeros)
        y = pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct(zeros.shape, jnp.float32),
            grid=(n_col, split),
            input_output_aliases={len(args) - 1: 0},
            compiler_params=params,
            interpret=interpret,
            name="sparse_input_matvec_splitk",
        )(*args)
        return y[:, :N].astype(x_BxK.dtype)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((B, N), x_BxK.dtype),
        grid=(n_col, 1),
        compiler_params=params,
        interpret=interpret,
        name="sparse_input_matvec",
    )(*args)


# ------------------------------------------------------------------------ TPU (Mosaic)


def _tpu_kernel(blk_ref, cnt_ref, *refs, K, block_k, n_steps, has_t, dot_dtype):
    if has_t:
        x_ref, t_ref, w_ref, y_ref, acc_ref = refs
    else:
        x_ref, w_ref, y_ref, acc_ref = refs
        t_ref = None
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(j < cnt_ref[0])
    def _():
        k0 = blk_ref[j] * block_k
        x = x_ref[...].astype(jnp.float32)  # [B, bk]
        row_ok_1xK = (k0 + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1)) < K
        t = None if t_ref is None else t_ref[...]
        x = jnp.where(row_ok_1xK, _kept(x, t), 0.0)
        row_ok_Kx1 = (k0 + jax.lax.broadcasted_iota(jnp.int32, (block_k, 1), 0)) < K
        w = jnp.where(row_ok_Kx1, w_ref[...], 0).astype(dot_dtype)
        acc_ref[...] += jnp.dot(
            x.astype(dot_dtype),
            w,
            preferred_element_type=jnp.float32,
            precision=jax.lax.Precision.HIGHEST if dot_dtype == jnp.float32 else None,
        )

    @pl.when(j == n_steps - 1)
    def _():
        y_ref[...] = acc_ref[...].astype(y_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_k", "block_n", "interpret"))
def _sparse_input_matvec_tpu(
    x_BxK: jax.Array,
    w_KxN: jax.Array,
    threshold: Any = None,
    *,
    block_k: int = 512,
    block_n: int = 512,
    interpret: bool = False,
) -> jax.Array:
    B, K = x_BxK.shape
    N = w_KxN.shape[1]
    dsp.check_block(_NAME, "block_k", block_k, power_of_2=False)
    dsp.check_block(_NAME, "block_n", block_n, power_of_2=False)
    has_t = threshold is not None
    t_1xK = dsp.threshold_row(_NAME, threshold, K) if has_t else None
    xk = _kept(x_BxK.astype(jnp.float32), t_1xK)
    blk, cnt = dsp.active_block_list(jnp.any(xk != 0.0, axis=0), block_k)
    n_steps = blk.shape[0]
    n_col = dsp.cdiv(N, block_n)
    in_specs = [pl.BlockSpec((B, block_k), lambda n, j, blk, cnt: (0, blk[j]))]
    args = [x_BxK]
    if has_t:
        in_specs.append(pl.BlockSpec((1, block_k), lambda n, j, blk, cnt: (0, blk[j])))
        args.append(t_1xK)
    in_specs.append(pl.BlockSpec((block_k, block_n), lambda n, j, blk, cnt: (blk[j], n)))
    args.append(w_KxN)
    same = x_BxK.dtype == w_KxN.dtype and x_BxK.dtype != jnp.float16
    dot_dtype = x_BxK.dtype if same else jnp.float32
    kernel = functools.partial(
        _tpu_kernel,
        K=K,
        block_k=block_k,
        n_steps=n_steps,
        has_t=has_t,
        dot_dtype=jnp.dtype(dot_dtype),
    )
    grid_spec = dsp.prefetch_grid_spec(
        num_scalar_prefetch=2,
        grid=(n_col, n_steps),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((B, block_n), lambda n, j, blk, cnt: (0, n)),
        scratch_shapes=[dsp.vmem((B, block_n), jnp.float32)],
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((B, N), x_BxK.dtype),
        grid_spec=grid_spec,
        compiler_params=dsp.tpu_compiler_params(("parallel", "arbitrary")),
        interpret=dsp.tpu_interpret_params() if interpret else False,
        name="sparse_input_matvec_tpu",
    )(blk, cnt, *args)


# ------------------------------------------------------------------------ dispatcher


def sparse_input_matvec(
    x_BxK: jax.Array,
    w_KxN: jax.Array,
    threshold: Any = None,
    *,
    impl: str = "auto",
    block_k: int | None = None,
    block_n: int | None = None,
    **kernel_options: Any,
) -> jax.Array:
    """`y[B, N] = (x * (abs(x) >= t)) @ W`, reading only the rows of W still in use.

    Args:
      x_BxK: activations [B, K] (float32/bfloat16).
      w_KxN: weight [K, N], input channels as rows (the transpose of torch's Linear).
      threshold: None (skip exact zeros), a scalar, or [K] per-channel thresholds;
        entries with abs(x) < t are zeroed.
      impl: "auto" (by backend: gpu, tpu, else reference), "reference", "gpu", "tpu",
        "gpu_interpret", "tpu_interpret".
      block_k, block_n: tile sizes (powers of 2 on GPU); None picks the kernel default.
      kernel_options: GPU only: split_k, num_warps, num_stages.

    Returns:
      y [B, N] in x.dtype, accumulated in float32.
    """
    which = dsp.resolve_impl(impl, fn_name=_NAME)
    _check(x_BxK, w_KxN, threshold)
    blocks = {}
    if block_k is not None:
        blocks["block_k"] = block_k
    if block_n is not None:
        blocks["block_n"] = block_n
    if which == "reference":
        return sparse_input_matvec_reference(x_BxK, w_KxN, threshold)
    if which in ("gpu", "gpu_interpret"):
        return _sparse_input_matvec_gpu(
            x_BxK,
            w_KxN,
            threshold,
            interpret=which == "gpu_interpret",
            **blocks,
            **kernel_options,
        )
    if kernel_options:
        raise ValueError(f"{_NAME}: options {sorted(kernel_options)} apply to the GPU kernel only.")
    return _sparse_input_matvec_tpu(
        x_BxK, w_KxN, threshold, interpret=which == "tpu_interpret", **blocks
    )
