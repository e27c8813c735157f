"""Head-sparse decode attention (Deja Vu): q, attention and o for selected heads only.

One decode step. Given x [B, d], a per-token head selection [B, H] (nonzero = selected;
`head_mask_from_indices` turns a list of head indices into one), the projections and a
KV cache [B, S, Hkv, Dh], compute

    y[b] = sum over selected heads h of  Attn_h(x[b]) @ Wo_h

with grouped-query attention (H query heads share Hkv kv heads, G = H // Hkv; query
head h reads kv head h // G, and a kv head's cache is read only when one of its query
heads is selected). RoPE uses precomputed cos/sin [B, Dh] of the current position,
rotate-half convention as in HF Llama.

The KV choice (reference and kernels agree): K and V of the new token are computed for
EVERY kv head and written to the cache, densely. Skipping them would leave holes in the
cache that a later token, which may select the head, would attend to; and they are
cheap: on Llama-3-8B k+v weights are 2 x 4096 x 1024, a quarter of the q+o bytes
(2 x 4096 x 4096) that head sparsity skips. So the sparse work is q, attention, o.

Weight layouts (all rows contiguous per head, so a head's weights are one block):
  wq_HDhxd  [H*Dh, d]    torch q_proj.weight as is
  wk_HkvDhxd, wv_HkvDhxd [Hkv*Dh, d]  torch k_proj/v_proj.weight as is
  wo_HDhxd  [H*Dh, d]    the transpose of torch o_proj.weight ([d, H*Dh])

Holds: `head_sparse_attention_reference` (pure jnp, float32), the attention core as a
GPU (Pallas/Triton) and a TPU (Pallas/Mosaic, scalar prefetch of the active kv heads)
kernel, and the dispatcher `head_sparse_attention`. The kernel path is
  q = gated_matvec(x, head gate, wq)          only selected heads' rows of wq are read
  k, v = x @ wk^T, x @ wv^T (XLA, dense)      RoPE on q and k; k, v written to the cache
  o = attention core                          only selected heads; only their kv heads
  y = sparse_input_matvec(o, wo)              o is exactly 0 for unselected heads
Leaves out: prefill (dense, many tokens), paged caches, the predictor that picks heads,
and sliding windows. `lengths` must be < S (the new token's slot); not checked on device.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _dispatch as dsp
from pallas_kernels.gated_matvec import gated_matvec
from pallas_kernels.sparse_matvec import sparse_input_matvec

_NAME = "head_sparse_attention"
_HI = jax.lax.Precision.HIGHEST
_NEG = -1e30


def head_mask_from_indices(heads_BxK: jax.Array, num_heads: int) -> jax.Array:
    """[B, k] int head indices -> int32 mask [B, H] (1 = selected)."""
    onehot = jax.nn.one_hot(heads_BxK, num_heads, dtype=jnp.int32)
    return jnp.max(onehot, axis=1)


def _dims(x_Bxd, head_mask_BxH, wq, wk, wv, wo, k_cache, v_cache, lengths_B, cos, sin):
    """Validate shapes; return (B, d, H, Hkv, Dh, S)."""
    n = _NAME
    dsp.check_ndim(n, "x_Bxd", x_Bxd, 2, "[B, d]")
    dsp.check_ndim(n, "head_mask_BxH", head_mask_BxH, 2, "[B, H]")
    for name, a in (("wq_HDhxd", wq), ("wk_HkvDhxd", wk), ("wv_HkvDhxd", wv), ("wo_HDhxd", wo)):
        dsp.check_ndim(n, name, a, 2, "[heads*Dh, d]")
        dsp.check_float(n, name, a)
    dsp.check_ndim(n, "k_cache_BxSxHkvxDh", k_cache, 4, "[B, S, Hkv, Dh]")
    dsp.check_ndim(n, "v_cache_BxSxHkvxDh", v_cache, 4, "[B, S, Hkv, Dh]")
    dsp.check_ndim(n, "lengths_B", lengths_B, 1, "[B]")
    dsp.check_float(n, "x_Bxd", x_Bxd)
    B, d = x_Bxd.shape
    H = head_mask_BxH.shape[1]
    dsp.check_dim(n, "head_mask_BxH.shape[0] (B)", head_mask_BxH.shape[0], B)
    _, S, Hkv, Dh = k_cache.shape
    dsp.check_dim(n, "k_cache.shape[0] (B)", k_cache.shape[0], B)
    if v_cache.shape != k_cache.shape:
        raise ValueError(
            f"{n}: shape mismatch: v_cache {v_cache.shape} != k_cache {k_cache.shape}."
        )
    if H % Hkv:
        raise ValueError(f"{n}: H={H} query heads is not a multiple of Hkv={Hkv} kv heads.")
    if Dh % 2:
        raise ValueError(f"{n}: head dim Dh={Dh} must be even for rotate-half RoPE.")
    dsp.check_dim(n, "wq_HDhxd.shape", wq.shape, (H * Dh, d))
    dsp.check_dim(n, "wo_HDhxd.shape", wo.shape, (H * Dh, d))
    dsp.check_dim(n, "wk_HkvDhxd.shape", wk.shape, (Hkv * Dh, d))
    dsp.check_dim(n, "wv_HkvDhxd.shape", wv.shape, (Hkv * Dh, d))
    dsp.check_dim(n, "lengths_B.shape[0] (B)", lengths_B.shape[0], B)
    dsp.check_dim(n, "cos_BxDh.shape", tuple(cos.shape), (B, Dh))
    dsp.check_dim(n, "sin_BxDh.shape", tuple(sin.shape), (B, Dh))
    return B, d, H, Hkv, Dh, S


def _rope(t_BxHxDh: jax.Array, cos_BxDh: jax.Array, sin_BxDh: jax.Array) -> jax.Array:
    """Rotate-half RoPE (HF Llama) in float32."""
    t = t_BxHxDh.astype(jnp.float32)
    half = t.shape[-1] // 2
    rot = jnp.concatenate([-t[..., half:], t[..., :half]], axis=-1)
    c = cos_BxDh.astype(jnp.float32)[:, None, :]
    s = sin_BxDh.astype(jnp.float32)[:, None, :]
    return t * c + rot * s


def _project_kv_and_update_cache(x, wk, wv, k_cache, v_cache, lengths, cos, sin, Hkv, Dh):
    """Dense k/v of the new token for every kv head, RoPE on k, written at lengths[b]."""
    B = x.shape[0]
    xf = x.astype(jnp.float32)
    k = jnp.dot(xf, wk.astype(jnp.float32).T, precision=_HI).reshape(B, Hkv, Dh)
    v = jnp.dot(xf, wv.astype(jnp.float32).T, precision=_HI).reshape(B, Hkv, Dh)
    k = _rope(k, cos, sin)
    bidx = jnp.arange(B)
    k_cache = k_cache.at[bidx, lengths].set(k.astype(k_cache.dtype))
    v_cache = v_cache.at[bidx, lengths].set(v.astype(v_cache.dtype))
    return k_cache, v_cache


# ----------------------------------------------------------------------- reference


def head_sparse_attention_reference(
    x_Bxd: jax.Array,
    head_mask_BxH: jax.Array,
    wq_HDhxd: jax.Array,
    wk_HkvDhxd: jax.Array,
    wv_HkvDhxd: jax.Array,
    wo_HDhxd: jax.Array,
    k_cache_BxSxHkvxDh: jax.Array,
    v_cache_BxSxHkvxDh: jax.Array,
    lengths_B: jax.Array,
    cos_BxDh: jax.Array,
    sin_BxDh: jax.Array,
    **_blocks: Any,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Dense-math reference: every head computed, unselected heads' outputs dropped.

    Returns (y [B, d] in x.dtype, updated k_cache, updated v_cache).
    """
    B, _d, H, Hkv, Dh, S = _dims(
        x_Bxd,
        head_mask_BxH,
        wq_HDhxd,
        wk_HkvDhxd,
        wv_HkvDhxd,
        wo_HDhxd,
        k_cache_BxSxHkvxDh,
        v_cache_BxSxHkvxDh,
        lengths_B,
        cos_BxDh,
        sin_BxDh,
    )
    G = H // Hkv
    k_cache, v_cache = _project_kv_and_update_cache(
        x_Bxd,
        wk_HkvDhxd,
        wv_HkvDhxd,
        k_cache_BxSxHkvxDh,
        v_cache_BxSxHkvxDh,
        lengths_B,
        cos_BxDh,
        sin_BxDh,
        Hkv,
        Dh,
    )
    xf = x_Bxd.astype(jnp.float32)
    q = jnp.dot(xf, wq_HDhxd.astype(jnp.float32).T, precision=_HI).reshape(B, H, Dh)
    q = _rope(q, cos_BxDh, sin_BxDh)
    kf = jnp.repeat(k_cache.astype(jnp.float32), G, axis=2)  # [B, S, H, Dh]
    vf = jnp.repeat(v_cache.astype(jnp.float32), G, axis=2)
    scores = jnp.einsum("bhd,bshd->bhs", q, kf, precision=_HI) / math.sqrt(Dh)
    valid = jnp.arange(S)[None, None, :] <= lengths_B[:, None, None]
    scores = jnp.where(valid, scores, -jnp.inf)
    p = jax.nn.softmax(scores, axis=-1)
    o = jnp.einsum("bhs,bshd->bhd", p, vf, precision=_HI)
    o = jnp.where((head_mask_BxH != 0)[:, :, None], o, 0.0)
    y = jnp.dot(o.reshape(B, H * Dh), wo_HDhxd.astype(jnp.float32), precision=_HI)
    return y.astype(x_Bxd.dtype), k_cache, v_cache


# -------------------------------------------------------- attention core, GPU (Triton)


def _core_gpu_kernel(q_ref, hm_ref, len_ref, k_ref, v_ref, o_ref, *, G, Dh, block_s, scale):
    b = pl.program_id(0)
    kvh = pl.program_id(1)
    gs = dsp.static_indices(G)
    heads = [kvh * G + g for g in gs]
    sel = [hm_ref[b, h] != 0 for h in heads]
    any_sel = sel[0]
    for s_ in sel[1:]:
        any_sel = any_sel | s_
    length = len_ref[b]
    n_chunks = jnp.where(any_sel, (length + block_s - 1) // block_s, 0)
    qs = [q_ref[b, h, :].astype(jnp.float32) * scale for h in heads]

    def body(c, carry):
        s0 = c * block_s
        s_ok = (s0 + jnp.arange(block_s)) < length
        mask = jnp.broadcast_to(s_ok[:, None], (block_s, Dh))
        k = dsp.masked_load(k_ref.at[b, pl.ds(s0, block_s), kvh, :], mask, 0.0)
        v = dsp.masked_load(v_ref.at[b, pl.ds(s0, block_s), kvh, :], mask, 0.0)
        k = k.astype(jnp.float32)
        v = v.astype(jnp.float32)
        out = []
        for g in range(G):
            m_old, l_old, acc_old = carry[g]
            sc = jnp.where(s_ok, jnp.sum(k * qs[g][None, :], axis=1), _NEG)
            m_new = jnp.maximum(m_old, jnp.max(sc))
            alpha = jnp.exp(m_old - m_new)
            p = jnp.where(s_ok, jnp.exp(sc - m_new), 0.0)
            l_new = l_old * alpha + jnp.sum(p)
            acc_new = acc_old * alpha + jnp.sum(p[:, None] * v, axis=0)
            out.append((m_new, l_new, acc_new))
        return tuple(out)

    init = tuple(
        (jnp.float32(_NEG), jnp.float32(0.0), jnp.zeros((Dh,), jnp.float32)) for _ in range(G)
    )
    res = jax.lax.fori_loop(0, n_chunks, body, init)
    for g, h in enumerate(heads):
        _, l_g, acc_g = res[g]
        o = jnp.where(sel[g], acc_g / jnp.maximum(l_g, 1e-30), 0.0)
        o_ref[b, h, :] = o.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_s", "num_warps", "num_stages", "interpret"))
def _core_gpu(
    q_BxHxDh,
    hm_BxH,
    len_B,
    k_cache,
    v_cache,
    *,
    block_s=64,
    num_warps=4,
    num_stages=2,
    interpret=False,
):
    B, H, Dh = q_BxHxDh.shape
    Hkv = k_cache.shape[2]
    dsp.check_block(_NAME, "block_s", block_s, power_of_2=True)
    dsp.check_block(_NAME, "head dim Dh", Dh, power_of_2=True)
    kernel = functools.partial(
        _core_gpu_kernel, G=H // Hkv, Dh=Dh, block_s=block_s, scale=1.0 / math.sqrt(Dh)
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((B, H, Dh), q_BxHxDh.dtype),
        grid=(B, Hkv),
        compiler_params=dsp.triton_compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="head_sparse_attention_core",
    )(q_BxHxDh, hm_BxH, len_B, k_cache, v_cache)


# -------------------------------------------------------- attention core, TPU (Mosaic)


def _core_tpu_kernel(
    kvl_ref, cnt_ref, len_ref, hm_ref, q_ref, k_ref, v_ref, o_ref, *, G, H, S, scale
):
    b = pl.program_id(0)
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _():
        o_ref[...] = jnp.zeros_like(o_ref)

    @pl.when(j < cnt_ref[b])
    def _():
        kvh = kvl_ref[b, j]
        q = q_ref[...].astype(jnp.float32) * scale  # [G, Dh]
        k = k_ref[...].astype(jnp.float32)  # [S, Dh]
        v = v_ref[...].astype(jnp.float32)
        s = jax.lax.dot_general(
            q, k, (((1,), (1,)), ((), ())), precision=_HI, preferred_element_type=jnp.float32
        )  # [G, S]
        valid = jax.lax.broadcasted_iota(jnp.int32, (1, S), 1) < len_ref[b]
        s = jnp.where(valid, s, _NEG)
        p = jnp.where(valid, jnp.exp(s - jnp.max(s, axis=1, keepdims=True)), 0.0)
        o = jnp.dot(p, v, precision=_HI, preferred_element_type=jnp.float32)
        o = o / jnp.sum(p, axis=1, keepdims=True)
        row = jax.lax.broadcasted_iota(jnp.int32, (G, 1), 0)
        sel = jnp.zeros((G, 1), jnp.bool_)
        for g in range(G):
            sel = jnp.where(row == g, hm_ref[b * H + kvh * G + g] != 0, sel)
        o_ref[kvh] = jnp.where(sel, o, 0.0).astype(o_ref.dtype)


def _active_kv_lists(hm_BxH: jax.Array, Hkv: int):
    """Per batch row: the needed kv heads first (ascending), trailing entries repeating
    the last one; and their count. A kv head is needed if any of its query heads is."""
    B, H = hm_BxH.shape
    need = jnp.any((hm_BxH != 0).reshape(B, Hkv, H // Hkv), axis=2)
    ids = jnp.arange(Hkv, dtype=jnp.int32)
    order = jnp.argsort(jnp.where(need, ids, ids + Hkv), axis=1).astype(jnp.int32)
    cnt = jnp.sum(need.astype(jnp.int32), axis=1)
    last = jnp.take_along_axis(order, jnp.maximum(cnt - 1, 0)[:, None], axis=1)
    order = jnp.where(ids[None, :] < cnt[:, None], order, last)
    return order, cnt


@functools.partial(jax.jit, static_argnames=("interpret",))
def _core_tpu(q_BxHxDh, hm_BxH, len_B, k_cache, v_cache, *, interpret=False):
    B, H, Dh = q_BxHxDh.shape
    _, S, Hkv, _ = k_cache.shape
    G = H // Hkv
    kvl, cnt = _active_kv_lists(hm_BxH, Hkv)
    q4 = q_BxHxDh.reshape(B, Hkv, G, Dh)
    kernel = functools.partial(_core_tpu_kernel, G=G, H=H, S=S, scale=1.0 / math.sqrt(Dh))
    grid_spec = dsp.prefetch_grid_spec(
        num_scalar_prefetch=4,
        grid=(B, Hkv),
        in_specs=[
            pl.BlockSpec((None, None, G, Dh), lambda b, j, kvl, cnt, ln, hm: (b, kvl[b, j], 0, 0)),
            pl.BlockSpec((None, S, None, Dh), lambda b, j, kvl, cnt, ln, hm: (b, 0, kvl[b, j], 0)),
            pl.BlockSpec((None, S, None, Dh), lambda b, j, kvl, cnt, ln, hm: (b, 0, kvl[b, j], 0)),
        ],
        out_specs=pl.BlockSpec((None, Hkv, G, Dh), lambda b, j, kvl, cnt, ln, hm: (b, 0, 0, 0)),
    )
    o = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((B, Hkv, G, Dh), q_BxHxDh.dtype),
        grid_spec=grid_spec,
        compiler_params=dsp.tpu_compiler_params(("parallel", "arbitrary")),
        interpret=dsp.tpu_interpret_params() if interpret else False,
        name="head_sparse_attention_core_tpu",
    )(kvl, cnt, len_B, hm_BxH.reshape(B * H), q4, k_cache, v_cache)
    return o.reshape(B, H, Dh)


# ------------------------------------------------------------------------ dispatcher


def head_sparse_attention(
    x_Bxd: jax.Array,
    head_mask_BxH: jax.Array,
    wq_HDhxd: jax.Array,
    wk_HkvDhxd: jax.Array,
    wv_HkvDhxd: jax.Array,
    wo_HDhxd: jax.Array,
    k_cache_BxSxHkvxDh: jax.Array,
    v_cache_BxSxHkvxDh: jax.Array,
    lengths_B: jax.Array,
    cos_BxDh: jax.Array,
    sin_BxDh: jax.Array,
    *,
    impl: str = "auto",
    block_s: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One decode step of attention over the selected heads only.

    Args:
      x_Bxd: the normed hidden state [B, d].
      head_mask_BxH: nonzero where a query head is selected (bool/int/float) [B, H].
      wq_HDhxd, wk_HkvDhxd, wv_HkvDhxd, wo_HDhxd: see the module docstring.
      k_cache_BxSxHkvxDh, v_cache_BxSxHkvxDh: the caches; RoPE already applied to k.
      lengths_B: int, tokens already in the cache; the new token goes to slot
        lengths[b] and attends to slots 0..lengths[b].
      cos_BxDh, sin_BxDh: RoPE tables at the new token's position.
      impl: "auto", "reference", "gpu", "tpu", "gpu_interpret", "tpu_interpret".
      block_s: GPU only: cache positions per inner step (power of 2).

    Returns:
      (y [B, d] in x.dtype, k_cache, v_cache) with the new token's k/v written for
      every kv head.
    """
    which = dsp.resolve_impl(impl, fn_name=_NAME)
    args = (
        x_Bxd,
        head_mask_BxH,
        wq_HDhxd,
        wk_HkvDhxd,
        wv_HkvDhxd,
        wo_HDhxd,
        k_cache_BxSxHkvxDh,
        v_cache_BxSxHkvxDh,
        lengths_B,
        cos_BxDh,
        sin_BxDh,
    )
    B, _d, H, Hkv, Dh, _S = _dims(*args)
    if which == "reference":
        return head_sparse_attention_reference(*args)
    lengths = lengths_B.astype(jnp.int32)
    hm = (head_mask_BxH != 0).astype(jnp.int32)
    gate = jnp.repeat(hm, Dh, axis=1).astype(x_Bxd.dtype)
    q = gated_matvec(x_Bxd, gate, wq_HDhxd, impl=which).reshape(B, H, Dh)
    q = _rope(q, cos_BxDh, sin_BxDh).astype(x_Bxd.dtype)
    k_cache, v_cache = _project_kv_and_update_cache(
        x_Bxd,
        wk_HkvDhxd,
        wv_HkvDhxd,
        k_cache_BxSxHkvxDh,
        v_cache_BxSxHkvxDh,
        lengths,
        cos_BxDh,
        sin_BxDh,
        Hkv,
        Dh,
    )
    if which in ("gpu", "gpu_interpret"):
        extra = {} if block_s is None else {"block_s": block_s}
        o = _core_gpu(
            q, hm, lengths + 1, k_cache, v_cache, interpret=which == "gpu_interpret", **extra
        )
    else:
        o = _core_tpu(q, hm, lengths + 1, k_cache, v_cache, interpret=which == "tpu_interpret")
    y = sparse_input_matvec(o.reshape(B, H * Dh), wo_HDhxd, impl=which)
    return y, k_cache, v_cache
