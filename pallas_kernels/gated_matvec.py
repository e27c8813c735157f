"""Gated sparse-output matvec (CHESS up_proj): `gated_matvec`.

`h[B, m] = g[B, m] * (x[B, d] @ Wu^T)` with Wu stored `[m, d]` (rows contiguous, torch's
Linear layout), computing only the rows `i` of Wu where some `g[b, i] != 0`; the gate
multiply is fused.

It has a pure-jnp `*_reference` (float32 accumulation, result in x.dtype), a GPU
kernel (Pallas/Triton: masked row loads skip the memory traffic of inactive rows), a
TPU kernel (Pallas/Mosaic: the active rows, some g[b, i] != 0, are compacted into a
prefetched index list and each is copied from HBM by its own DMA, double-buffered; see
pallas_kernels/_row_dma.py) and a dispatcher (`impl="auto"` picks by backend). The TPU
`gated_matvec` computes u for the active rows in compacted order and scatters `g * u`
into h outside the kernel.

A SwiGLU FFN runs `gated_matvec` then `sparse_input_matvec(h, Wd)`. A fused up + down
kernel was measured on an H100 (benchmarks/results/kernels_h100.json,
benchmarks/NOTES_kernels.md): it tied with this pair at batch 1 and lost at batch 4, so
it was removed.

With `activation` (and `threshold`) the gate comes in as the gate projection's
pre-activation and the GPU kernel makes g itself, per block of rows: `g = act(pre)` in
float32 from `pre` rounded to x.dtype, rounded to x.dtype, then zeroed where
`|g| < threshold` (CHESS's and CATS's rule, `gate_values`). In a decode step this takes
the separate activation-and-threshold kernel off the path between the gate projection
and the up projection (benchmarks/NOTES_kernels.md). The TPU path computes the same g
with jnp before its kernel.

Leaves out: the gate projection itself (dense, read whole).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _dispatch as dsp
from pallas_kernels import _row_dma as rdma

_GATED = "gated_matvec"


def _check_gated(fn: str, x_Bxd: jax.Array, g_Bxm: jax.Array, wu_mxd: jax.Array) -> None:
    dsp.check_ndim(fn, "x_Bxd", x_Bxd, 2, "[B, d]")
    dsp.check_ndim(fn, "g_Bxm", g_Bxm, 2, "[B, m]")
    dsp.check_ndim(fn, "wu_mxd", wu_mxd, 2, "[m, d]")
    for name, a in (("x_Bxd", x_Bxd), ("g_Bxm", g_Bxm), ("wu_mxd", wu_mxd)):
        dsp.check_float(fn, name, a)
    dsp.check_dim(fn, "g_Bxm.shape[0] (B)", g_Bxm.shape[0], x_Bxd.shape[0])
    dsp.check_dim(fn, "wu_mxd.shape[0] (m)", wu_mxd.shape[0], g_Bxm.shape[1])
    dsp.check_dim(fn, "wu_mxd.shape[1] (d)", wu_mxd.shape[1], x_Bxd.shape[1])


_HI = jax.lax.Precision.HIGHEST

# The gate activations `activation=` takes (the models' names: `ModelConfig.activation`).
ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


def _check_gate_rule(fn: str, activation: str | None, threshold: Any, m: int) -> None:
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(
            f"{fn}: activation={activation!r} is not one of {sorted(ACTIVATIONS)} "
            "(or None: g is the gate itself)."
        )
    if threshold is not None:
        shape = jnp.shape(threshold)
        if shape not in ((), (1,), (m,)):
            raise ValueError(
                f"{fn}: threshold has shape {shape}; pass a scalar or one per row of "
                f"wu_mxd, shape ({m},)."
            )


def gate_values(
    pre: jax.Array, activation: str | None, threshold: jax.Array | None, dtype: Any
) -> jax.Array:
    """The gate g in float32 (its values are those of `dtype`) from the gate projection
    `pre`: `act(pre)` computed in float32 from pre rounded to `dtype`, rounded to `dtype`,
    zeroed where `|g| < threshold` (threshold rounded to `dtype`, broadcast on the last
    axis). `activation=None` and `threshold=None` leave pre as it is (rounded to dtype).
    The jaxsparse models apply the same rule in XLA (`SwiGLU`, `rules.sparsify`)."""
    g = pre.astype(dtype).astype(jnp.float32)
    if activation is not None:
        g = ACTIVATIONS[activation](g).astype(dtype).astype(jnp.float32)
    if threshold is not None:
        t = jnp.asarray(threshold).astype(dtype).astype(jnp.float32)
        g = jnp.where(jnp.abs(g) >= t, g, 0.0)
    return g


# ----------------------------------------------------------------------- references


def gated_matvec_reference(
    x_Bxd: jax.Array,
    g_Bxm: jax.Array,
    wu_mxd: jax.Array,
    activation: str | None = None,
    threshold: jax.Array | None = None,
    **_blocks: Any,
) -> jax.Array:
    """`g * (x @ Wu^T)` in float32, returned in x.dtype (block sizes ignored); with
    `activation`/`threshold`, g is `gate_values(g_Bxm, ...)`."""
    _check_gated(_GATED, x_Bxd, g_Bxm, wu_mxd)
    _check_gate_rule(_GATED, activation, threshold, wu_mxd.shape[0])
    if activation is not None or threshold is not None:
        g_Bxm = gate_values(g_Bxm, activation, threshold, x_Bxd.dtype)
    u = jnp.dot(x_Bxd.astype(jnp.float32), wu_mxd.astype(jnp.float32).T, precision=_HI)
    return (g_Bxm.astype(jnp.float32) * u).astype(x_Bxd.dtype)


# ------------------------------------------------------------------------ GPU (Triton)


def _gated_rows(x_ref, g_ref, t_ref, wu_ref, *, rows, B, m, d, r0, block_m, block_d, activation):
    """float32 h for rows r0..r0+block_m of one program, and the row-active mask. With
    `activation` or a threshold ref, g_ref holds the pre-activation (`gate_values`)."""
    r_ok = (r0 + jnp.arange(block_m)) < m
    gs = [
        dsp.masked_load(g_ref.at[rows[b], pl.ds(r0, block_m)], r_ok, 0.0).astype(jnp.float32)
        for b in range(B)
    ]
    if activation is not None or t_ref is not None:
        t = None
        if t_ref is not None:  # [1] (one threshold) or [m] (one per row)
            t = dsp.masked_load(t_ref.at[pl.ds(r0, block_m)], r_ok, 0.0)
        gs = [gate_values(gb, activation, t, x_ref.dtype) for gb in gs]
    active = gs[0] != 0.0
    for gb in gs[1:]:
        active = active | (gb != 0.0)

    def body(j, accs):
        d0 = j * block_d
        d_ok = (d0 + jnp.arange(block_d)) < d
        w = dsp.masked_load(
            wu_ref.at[pl.ds(r0, block_m), pl.ds(d0, block_d)],
            active[:, None] & d_ok[None, :],
            0.0,
        ).astype(jnp.float32)
        out = []
        for b in range(B):
            xb = dsp.masked_load(x_ref.at[rows[b], pl.ds(d0, block_d)], d_ok, 0.0)
            out.append(accs[b] + jnp.sum(w * xb.astype(jnp.float32)[None, :], axis=1))
        return tuple(out)

    init = tuple(jnp.zeros((block_m,), jnp.float32) for _ in range(B))
    us = jax.lax.fori_loop(0, dsp.cdiv(d, block_d), body, init)
    return [gb * ub for gb, ub in zip(gs, us)], active, r_ok


def _gated_gpu_kernel(*refs, B, m, d, block_m, block_d, activation, has_threshold):
    x_ref, g_ref, *t, wu_ref, h_ref = refs
    t_ref = t[0] if has_threshold else None
    rows = dsp.static_indices(B)
    r0 = pl.program_id(0) * block_m
    hs, _, r_ok = _gated_rows(
        x_ref,
        g_ref,
        t_ref,
        wu_ref,
        rows=rows,
        B=B,
        m=m,
        d=d,
        r0=r0,
        block_m=block_m,
        block_d=block_d,
        activation=activation,
    )
    for b in range(B):
        dsp.masked_store(h_ref.at[rows[b], pl.ds(r0, block_m)], hs[b].astype(h_ref.dtype), r_ok)


@functools.partial(
    jax.jit,
    static_argnames=(
        "activation",
        "block_m",
        "block_d",
        "num_warps",
        "num_stages",
        "interpret",
    ),
)
def _gated_matvec_gpu(
    x_Bxd,
    g_Bxm,
    wu_mxd,
    activation=None,
    threshold=None,
    *,
    # 8 x 256 rows with 2 warps: 20.5 us at 50% on 14336 x 4096 (H200, the gate's rule in
    # the kernel), 16 x 256 with 4 warps 21.3 us, 8 x 256 with 4 warps 27.7 us (the sweep
    # in benchmarks/results/kernels_sweep_dense_h200.json; kernels_shapes_h200.json before)
    block_m=8,
    block_d=256,
    num_warps=2,
    num_stages=3,
    interpret=False,
):
    B, d = x_Bxd.shape
    m = wu_mxd.shape[0]
    dsp.check_block(_GATED, "block_m", block_m, power_of_2=True)
    dsp.check_block(_GATED, "block_d", block_d, power_of_2=True)
    thresholds = []
    if threshold is not None:  # one per row of Wu, float32 (a scalar broadcast here)
        thresholds = [jnp.broadcast_to(jnp.asarray(threshold, jnp.float32).reshape(-1), (m,))]
    kernel = functools.partial(
        _gated_gpu_kernel,
        B=B,
        m=m,
        d=d,
        block_m=block_m,
        block_d=block_d,
        activation=activation,
        has_threshold=threshold is not None,
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((B, m), x_Bxd.dtype),
        grid=(dsp.cdiv(m, block_m),),
        compiler_params=dsp.triton_compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="gated_matvec",
    )(x_Bxd, g_Bxm, *thresholds, wu_mxd)


# ------------------------------------------------------------------------ TPU (Mosaic)

TPU_BLOCK_M = 128  # compacted rows per chunk (the MXU's width)


def _dot_dtype(*arrays: jax.Array) -> jnp.dtype:
    dts = {jnp.dtype(a.dtype) for a in arrays}
    if dts == {jnp.dtype(jnp.bfloat16)}:
        return jnp.dtype(jnp.bfloat16)
    return jnp.dtype(jnp.float32)


def _dot_nt(a, b, dot_dtype):
    """a [B, d] x b [r, d] -> [B, r] in float32."""
    return jax.lax.dot_general(
        a.astype(dot_dtype),
        b.astype(dot_dtype),
        (((1,), (1,)), ((), ())),
        preferred_element_type=jnp.float32,
        precision=_HI if dot_dtype == jnp.float32 else None,
    )


def _check_tpu_block_m(fn: str, block_m: int, dtype: Any) -> None:
    sub = rdma.sublane_rows(dtype)
    if not isinstance(block_m, int) or block_m <= 0 or block_m % sub:
        raise ValueError(
            f"{fn}: block_m={block_m!r} (rows per chunk) must be a positive multiple of "
            f"{sub}, the sublane tile of {dtype}, for the TPU kernel."
        )


def _split_counter(rest, count_copies):
    if count_copies:
        copied_ref, *scratch = rest
        copied_ref[0] = 0
        return (copied_ref, 0), scratch
    return None, list(rest)


def _gated_tpu_kernel(
    ids_ref, cnt_ref, x_ref, wu_hbm, uc_ref, *rest, block_m, dot_dtype, count_copies
):
    counter, (wbuf, sems) = _split_counter(rest, count_copies)

    def chunk(c, slot):
        uc_ref[c] = _dot_nt(x_ref[...], wbuf[slot], dot_dtype)  # [B, block_m]

    rdma.for_each_chunk(
        ids_ref,
        cnt_ref[0],
        block_m,
        [(lambda k: wu_hbm.at[pl.ds(k, 1)], wbuf)],
        sems,
        chunk,
        counter,
    )


def _counter_out(count_copies, specs, shapes):
    if count_copies:
        specs.append(rdma.smem_spec())
        shapes.append(jax.ShapeDtypeStruct((1,), jnp.int32))
    return specs, shapes


@functools.partial(jax.jit, static_argnames=("activation", "block_m", "interpret", "count_copies"))
def _gated_matvec_tpu(
    x_Bxd,
    g_Bxm,
    wu_mxd,
    activation=None,
    threshold=None,
    *,
    block_m=TPU_BLOCK_M,
    interpret=False,
    count_copies=False,
):
    """The TPU kernel computes `u = x @ Wu[i]^T` for the active rows i only, in compacted
    order ([n_chunks, B, block_m] float32); a scatter then places `g * u` in h. With
    `count_copies` it also returns the number of row DMAs started, int32 [1]. With
    `activation`/`threshold`, g is made first, in XLA (`gate_values`)."""
    B, d = x_Bxd.shape
    m = wu_mxd.shape[0]
    if activation is not None or threshold is not None:
        g_Bxm = gate_values(g_Bxm, activation, threshold, x_Bxd.dtype)
    _check_tpu_block_m(_GATED, block_m, wu_mxd.dtype)
    ids, cnt = rdma.compact_rows(jnp.any(g_Bxm != 0, axis=0), block_m)
    n_chunks = ids.shape[0] // block_m
    kernel = functools.partial(
        _gated_tpu_kernel,
        block_m=block_m,
        dot_dtype=_dot_dtype(x_Bxd, wu_mxd),
        count_copies=count_copies,
    )
    full = (n_chunks, B, block_m)
    specs, shapes = _counter_out(
        count_copies,
        [pl.BlockSpec(full, lambda i, ids, cnt: (0, 0, 0))],
        [jax.ShapeDtypeStruct(full, jnp.float32)],
    )
    grid_spec = dsp.prefetch_grid_spec(
        num_scalar_prefetch=2,
        grid=(1,),
        in_specs=[pl.BlockSpec((B, d), lambda i, ids, cnt: (0, 0)), rdma.any_spec()],
        out_specs=specs,
        scratch_shapes=[dsp.vmem((2, block_m, d), wu_mxd.dtype), rdma.dma_semaphores(2)],
    )
    out = pl.pallas_call(
        kernel,
        out_shape=shapes,
        grid_spec=grid_spec,
        compiler_params=dsp.tpu_compiler_params(("arbitrary",)),
        interpret=dsp.tpu_interpret_params() if interpret else False,
        name="gated_matvec_tpu",
    )(ids, cnt, x_Bxd, wu_mxd)
    # Chunk slots past the count hold stale values: their target index m is dropped.
    u = out[0].transpose(1, 0, 2).reshape(B, n_chunks * block_m)
    slot_ok = jnp.arange(n_chunks * block_m) < cnt[0]
    target = jnp.where(slot_ok, ids, m)
    u_Bxm = jnp.zeros((B, m), jnp.float32).at[:, target].set(u, mode="drop")
    h = (g_Bxm.astype(jnp.float32) * u_Bxm).astype(x_Bxd.dtype)
    return (h, out[1]) if count_copies else h


# ----------------------------------------------------------------------- dispatchers


def _route(fn_name, impl, kernel_options, reference, gpu, tpu, args, blocks):
    which = dsp.resolve_impl(impl, fn_name=fn_name)
    blocks = {k: v for k, v in blocks.items() if v is not None}
    if which == "reference":
        return reference(*args)
    if which in ("gpu", "gpu_interpret"):
        return gpu(*args, interpret=which == "gpu_interpret", **blocks, **kernel_options)
    blocks.pop("block_d", None)  # the TPU kernels take whole rows of d
    if kernel_options:
        raise ValueError(
            f"{fn_name}: options {sorted(kernel_options)} apply to the GPU kernel only."
        )
    return tpu(*args, interpret=which == "tpu_interpret", **blocks)


def gated_matvec(
    x_Bxd: jax.Array,
    g_Bxm: jax.Array,
    wu_mxd: jax.Array,
    *,
    activation: str | None = None,
    threshold: jax.Array | None = None,
    impl: str = "auto",
    block_m: int | None = None,
    block_d: int | None = None,
    **kernel_options: Any,
) -> jax.Array:
    """`h[B, m] = g * (x @ Wu^T)`, computing only rows of Wu where some g != 0.

    Args:
      x_Bxd: FFN input [B, d]. g_Bxm: gate (already sparsified) [B, m], or with
        `activation`/`threshold` the gate projection before its activation (any float
        dtype: the float32 accumulator of the gate's matvec needs no cast pass).
      wu_mxd: up projection [m, d] (torch Linear layout, rows contiguous).
      activation: None, or "silu" / "gelu_tanh": g is `act(g_Bxm)` (`gate_values`).
      threshold: None, a scalar or [m]: g is zeroed where `|g| < threshold`.
      impl: "auto", "reference", "gpu", "tpu", "gpu_interpret", "tpu_interpret".
      block_m: rows of Wu per program (GPU: power of 2) / per grid step (TPU).
      block_d: GPU only, columns of Wu per inner step (power of 2).
      kernel_options: GPU only: num_warps, num_stages.

    Returns:
      h [B, m] in x.dtype (float32 accumulation; exact zeros where g == 0).
    """
    _check_gated(_GATED, x_Bxd, g_Bxm, wu_mxd)
    _check_gate_rule(_GATED, activation, threshold, wu_mxd.shape[0])
    return _route(
        _GATED,
        impl,
        kernel_options,
        gated_matvec_reference,
        _gated_matvec_gpu,
        _gated_matvec_tpu,
        (x_Bxd, g_Bxm, wu_mxd, activation, threshold),
        {"block_m": block_m, "block_d": block_d},
    )
