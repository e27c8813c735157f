"""Residual add, RMSNorm and input thresholds of a decode block in one launch.

A sparse decode step at batch 1 runs, around each norm of a Llama-style block, a chain of
small XLA kernels: the residual add with the norm's sum of squares (one reduction
fusion), the normalization with the next projections' input threshold (one loop
fusion), and, before the block's first split-K matvec, the zero-fill of the block's
float32 accumulators (one more). Each takes 1.3-1.8 us on an H200 for a few KB of data
(benchmarks/NOTES_kernels.md, "The attention kernel prepares q, k and v"). This kernel
does all of it in one launch:

    r       = x + delta[:, col:col + D].astype(x.dtype)        (or x, without delta)
    normed  = scale * (r32 * rsqrt(mean(r32 ** 2) + eps)).astype(scale.dtype)
    kept_i  = where(abs(normed) >= t_i.astype(normed.dtype), normed, 0)
    zeros_j = float32 zeros of shape_j

with `r32 = r.astype(float32)`: the rounding of `jaxsparse.models.layers.RMSNorm` (HF's
`weight * hidden.to(input_dtype)`) and `jaxsparse.rules.sparsify`. `delta` is a float32
array [B, W] whose columns `col ... col + D` hold the value to add (a projection's
split-K accumulator, read where the projection left it: no slice kernel before this one).

Holds: `residual_rms_norm_reference` (pure jnp), the GPU (Pallas/Triton) kernel and the
dispatcher `residual_rms_norm`.
- GPU: grid of B + Z programs. Program b < B normalizes row b in one block of the next
  power of two >= D elements (masked past D); the others each zero one block of
  `ZERO_BLOCK` float32 columns of one row of one zero output.
- TPU, and the reference: jnp (XLA's TPU fusions already make the norm one kernel);
  `impl="tpu"` and `"tpu_interpret"` run the reference.

Leaves out: Gemma's `(1 + scale)` norm, LayerNorm (OPT), and what the model does with the
outputs (jaxsparse/models/llama.py calls this in pallas decode steps).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _dispatch as dsp

_NAME = "residual_rms_norm"
ZERO_BLOCK = 4096  # float32 columns zeroed by one program (16 KB)
# Warps per program: the fastest of 1-16 on an H200 at d=4096, 1.89 us per norm against
# 2.26 with 4 (benchmarks/results/fused_norms_h200/norms_h200.json)
NUM_WARPS = 16


class RmsNormOut(NamedTuple):
    """`residual`: x + delta (x itself without delta), x's dtype [B, D]. `normed`: the
    norm's output [B, D] in scale's dtype (None unless asked for). `kept`: one thresholded
    copy of `normed` per threshold. `zeros`: the float32 zero arrays asked for."""

    residual: jax.Array
    normed: jax.Array | None
    kept: tuple[jax.Array, ...]
    zeros: tuple[jax.Array, ...]


def _check(x, scale, delta, col, thresholds, zeros) -> int:
    n = _NAME
    dsp.check_ndim(n, "x_BxD", x, 2, "[B, D]")
    dsp.check_float(n, "x_BxD", x)
    B, D = x.shape
    dsp.check_ndim(n, "scale_D", scale, 1, "[D]")
    dsp.check_dim(n, "scale_D's length (x's D)", scale.shape[0], D)
    dsp.check_float(n, "scale_D", scale)
    if delta is not None:
        dsp.check_ndim(n, "delta", delta, 2, "[B, W]")
        if delta.shape[0] < B:
            raise ValueError(
                f"{n}: delta has {delta.shape[0]} rows, fewer than x's {B}; pass a delta "
                "with at least B rows (rows past B are not read)."
            )
        if jnp.dtype(delta.dtype) != jnp.dtype(jnp.float32):
            raise ValueError(f"{n}: delta has dtype {delta.dtype}; expected float32.")
        if not isinstance(col, int) or col < 0 or col + D > delta.shape[1]:
            raise ValueError(
                f"{n}: delta_col={col!r} with D={D} needs columns up to {col!r} + {D}, but "
                f"delta has {delta.shape[1]} columns; pass a column in [0, {delta.shape[1] - D}]."
            )
    elif col != 0:
        raise ValueError(f"{n}: delta_col={col!r} given without delta; pass delta or drop it.")
    for t in thresholds:
        dsp.threshold_row(n, t, D)  # raises on a bad shape
    for s in zeros:
        if not (
            isinstance(s, tuple) and len(s) == 2 and all(isinstance(v, int) and v > 0 for v in s)
        ):
            raise ValueError(
                f"{n}: zeros must be (rows, columns) tuples of positive ints, got {s!r}."
            )
    return D


def residual_rms_norm_reference(
    x_BxD: jax.Array,
    scale_D: jax.Array,
    *,
    eps: float,
    delta: jax.Array | None = None,
    delta_col: int = 0,
    thresholds: tuple = (),
    normed: bool = True,
    zeros: tuple = (),
) -> RmsNormOut:
    """The pure-jnp reference (the formulas in the module docstring)."""
    D = _check(x_BxD, scale_D, delta, delta_col, thresholds, zeros)
    r = x_BxD
    if delta is not None:
        B = x_BxD.shape[0]
        r = x_BxD + delta[:B, delta_col : delta_col + D].astype(x_BxD.dtype)
    r32 = r.astype(jnp.float32)
    n = r32 * jax.lax.rsqrt(jnp.mean(r32 * r32, axis=-1, keepdims=True) + eps)
    h = scale_D * n.astype(scale_D.dtype)
    kept = []
    for t in thresholds:
        t = jnp.asarray(t, jnp.float32).astype(h.dtype)
        kept.append(jnp.where(jnp.abs(h) >= t, h, jnp.zeros((), h.dtype)))
    zs = tuple(jnp.zeros(s, jnp.float32) for s in zeros)
    return RmsNormOut(r, h if normed else None, tuple(kept), zs)


# -------------------------------------------------------------------------- GPU (Triton)


def _gpu_kernel(*refs, B, D, BD, eps, col, has_delta, n_t, normed, zero_plan):
    """Programs 0..B-1: row b's residual, norm and thresholded copies. Then, per zero
    output j, `zero_plan[j] = (first program, rows, blocks per row)`: one block of
    `ZERO_BLOCK` columns each."""
    it = iter(refs)
    x_ref = next(it)
    d_ref = next(it) if has_delta else None
    s_ref = next(it)
    t_refs = [next(it) for _ in range(n_t)]
    r_ref = next(it) if has_delta else None
    n_ref = next(it) if normed else None
    k_refs = [next(it) for _ in range(n_t)]
    z_refs = list(it)
    pid = pl.program_id(0)  # read outside the branches (the interpreter's rule)
    lane = jnp.arange(BD)
    ok = lane < D
    # block starts as traced values: a static start with BD > D fails Pallas's bounds check
    # (and a literal row index has no interpret-mode load rule: `dsp.static_indices`)
    zero = 0 * pid
    at = lambda start: pl.ds(zero + start, BD)

    @pl.when(pid < B)
    def _norm():
        x = dsp.masked_load(x_ref.at[pid, at(0)], ok)
        if has_delta:
            d = dsp.masked_load(d_ref.at[pid, at(col)], ok).astype(x.dtype)
            x = (x.astype(jnp.float32) + d.astype(jnp.float32)).astype(x.dtype)
            dsp.masked_store(r_ref.at[pid, at(0)], x, ok)
        r32 = jnp.where(ok, x.astype(jnp.float32), 0.0)
        inv = jax.lax.rsqrt(jnp.sum(r32 * r32) / D + eps)
        sdt = s_ref.dtype
        s = dsp.masked_load(s_ref.at[zero, at(0)], ok).astype(jnp.float32)
        h = (s * (r32 * inv).astype(sdt).astype(jnp.float32)).astype(sdt)
        if normed:
            dsp.masked_store(n_ref.at[pid, at(0)], h, ok)
        for t_ref, k_ref in zip(t_refs, k_refs):
            t = dsp.masked_load(t_ref.at[zero, at(0)], ok).astype(sdt).astype(jnp.float32)
            keep = jnp.abs(h.astype(jnp.float32)) >= t
            dsp.masked_store(k_ref.at[pid, at(0)], jnp.where(keep, h, 0).astype(sdt), ok)

    zeros = jnp.zeros((ZERO_BLOCK,), jnp.float32)
    lanes_z = jnp.arange(ZERO_BLOCK)
    for z_ref, (first, rows, blocks) in zip(z_refs, zero_plan):

        @pl.when((pid >= first) & (pid < first + rows * blocks))
        def _fill(z_ref=z_ref, first=first, blocks=blocks):
            c = pid - first
            row, c0 = c // blocks, (c % blocks) * ZERO_BLOCK
            cols = z_ref.shape[1]
            dsp.masked_store(z_ref.at[row, pl.ds(c0, ZERO_BLOCK)], zeros, c0 + lanes_z < cols)


@functools.partial(
    jax.jit,
    static_argnames=("eps", "delta_col", "normed", "zeros", "num_warps", "interpret"),
)
def _residual_rms_norm_gpu(
    x_BxD,
    scale_D,
    delta,
    thresholds,
    *,
    eps,
    delta_col,
    normed,
    zeros,
    num_warps,
    interpret,
):
    B, D = x_BxD.shape
    BD = pl.next_power_of_2(D) if hasattr(pl, "next_power_of_2") else 1 << (D - 1).bit_length()
    has_delta = delta is not None
    n_t = len(thresholds)
    plan, first = [], B
    for rows, cols in zeros:
        blocks = dsp.cdiv(cols, ZERO_BLOCK)
        plan.append((first, rows, blocks))
        first += rows * blocks
    inputs = [x_BxD] + ([delta] if has_delta else []) + [scale_D.reshape(1, D)]
    inputs += [dsp.threshold_row(_NAME, t, D) for t in thresholds]
    outs = [jax.ShapeDtypeStruct((B, D), x_BxD.dtype)] if has_delta else []
    outs += [jax.ShapeDtypeStruct((B, D), scale_D.dtype)] if normed else []
    outs += [jax.ShapeDtypeStruct((B, D), scale_D.dtype)] * n_t
    outs += [jax.ShapeDtypeStruct(s, jnp.float32) for s in zeros]
    kernel = functools.partial(
        _gpu_kernel,
        B=B,
        D=D,
        BD=BD,
        eps=float(eps),
        col=delta_col,
        has_delta=has_delta,
        n_t=n_t,
        normed=normed,
        zero_plan=tuple(plan),
    )
    res = pl.pallas_call(
        kernel,
        out_shape=tuple(outs),
        grid=(first,),
        compiler_params=dsp.triton_compiler_params(num_warps, 1),
        interpret=interpret,
        name="residual_rms_norm",
    )(*inputs)
    res = list(res)
    residual = res.pop(0) if has_delta else x_BxD
    h = res.pop(0) if normed else None
    kept = tuple(res[:n_t])
    return RmsNormOut(residual, h, kept, tuple(res[n_t:]))


def residual_rms_norm(
    x_BxD: jax.Array,
    scale_D: jax.Array,
    *,
    eps: float,
    delta: jax.Array | None = None,
    delta_col: int = 0,
    thresholds: tuple | list = (),
    normed: bool = True,
    zeros: tuple | list = (),
    impl: str = "auto",
    num_warps: int | None = NUM_WARPS,
) -> RmsNormOut:
    """The residual add, RMSNorm and thresholds of a decode block's input, in one launch
    on a GPU (module docstring).

    Args:
      x_BxD: the residual stream [B, D] (float32, bfloat16 or float16).
      scale_D: the norm's weight [D]; the outputs take its dtype.
      eps: the norm's epsilon.
      delta: float32 [B' >= B, W]: its first B rows, from column `delta_col` (a Python
        int) on, are added to x after rounding to x's dtype; None: nothing added
        (`residual` is x).
      thresholds: thresholds (each a scalar or one per channel, [D]); one thresholded copy
        of the norm's output each, in order.
      normed: whether to return the norm's output itself.
      zeros: (rows, columns) shapes of float32 zero arrays to return as well (a decode
        block's split-K accumulators).
      impl: "auto", "reference", "gpu", "gpu_interpret", "tpu", "tpu_interpret" (the TPU
        names run the reference).
      num_warps: the GPU kernel's warps per program.

    Returns:
      `RmsNormOut(residual, normed, kept, zeros)`.
    """
    which = dsp.resolve_impl(impl, fn_name=_NAME)
    thresholds, zeros = tuple(thresholds), tuple(tuple(s) for s in zeros)
    _check(x_BxD, scale_D, delta, delta_col, thresholds, zeros)
    if which not in ("gpu", "gpu_interpret"):
        return residual_rms_norm_reference(
            x_BxD,
            scale_D,
            eps=eps,
            delta=delta,
            delta_col=delta_col,
            thresholds=thresholds,
            normed=normed,
            zeros=zeros,
        )
    out = _residual_rms_norm_gpu(
        x_BxD,
        scale_D,
        delta,
        thresholds,
        eps=float(eps),
        delta_col=delta_col,
        normed=normed,
        zeros=zeros,
        num_warps=num_warps,
        interpret=which == "gpu_interpret",
    )
    return out if delta is not None else out._replace(residual=x_BxD)  # x itself, not a copy
