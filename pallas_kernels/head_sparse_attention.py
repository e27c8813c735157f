"""Head-sparse decode attention (Deja Vu): attention for the selected query heads only.

One decode step over the model's KV cache layout `[B, Hkv, S, Dh]`. Given the new
token's queries q [B, H, Dh], a per-row head selection [B, H] (nonzero = selected), and
which cache slots the token may attend (`kv_valid` [B, S]), compute

    o[b, h] = softmax(q[b, h] . K[b, h // G]^T * scale over valid slots) @ V[b, h // G]

for the selected heads, and exact zeros for the others (G = H // Hkv: grouped-query
attention; a kv head's cache is read only when one of its query heads is selected).
Slots at or past `kv_len` are never read (the cache's unused tail).

With `threshold` (a float32 threshold per output channel, [H * Dh], [H, Dh] or a
scalar), each output entry o with `abs(o) < threshold` is zeroed, the threshold rounded
to o's dtype first (`jaxsparse.rules.sparsify`'s rule): the o_proj input's threshold of a
sparse decode step, applied where o is written instead of by a kernel of its own.

With `new_kv=(k_new, v_new, slot)` the new token's k and v are written into the caches
at `slot` first (the caches come back updated); `head_sparse_attention_from_qkv` takes
them, and q, as the q/k/v projections left them (float32, in the models' fused layouts,
possibly inside a wider accumulator) and applies RoPE too. On a GPU all of it happens in
the attention's own launch: no slice, RoPE or cache-update kernels around it.

Holds: `head_sparse_attention_reference` (pure jnp, float32 softmax), a GPU
(Pallas/Triton) kernel, a TPU (Pallas/Mosaic) kernel, the dispatcher
`head_sparse_attention`, and `head_sparse_attention_from_qkv`.
- GPU: one program per (batch row, kv head); a program whose query heads are all
  unselected does nothing; the others walk the cache in chunks of `block_s` slots with
  an online softmax, loading only valid slots (masked loads). The kv head's query heads
  share each chunk: their scores and outputs are tensor-core dots of a 16-row tile
  (head dim and `block_s` at least 16). With `num_splits` > 1 the
  slots are split into that many contiguous ranges, one program each (more programs for
  a short batch and a long cache), which write their softmax's running max, sum and
  unnormalized output; a jnp epilogue merges them (and applies the mask and threshold).
- TPU: grid (batch row, kv-head step, slot block). Per batch row, the needed kv heads
  are compacted into a prefetched list; the K/V/q index maps read it, and steps past the
  list's length or past `kv_len` repeat the previous block index, so Pallas issues no
  copy for them. Online softmax in VMEM scratch. It copies whole slot blocks, so invalid
  slots below `kv_len` are read (with weight 0) and must hold finite values.

- GPU, writing the cache: the program whose slot range holds the new slot writes the new
  row (the cache inputs are aliased to the outputs, so XLA updates them in place) and
  every program reads the new k/v from registers in place of that slot's cache row.
  Under RoPE each head vector is held as its two halves (rotate-half pairs column i
  with i + Dh/2), and the scores are the sum of two dots.
- TPU and the reference: the cache write is a dynamic_update_slice before the attention.

Leaves out (model code, in jaxsparse/models/attention.py): the q/k/v projections and the
output projection; prefill; paged caches; sliding windows (pass them through
`kv_valid`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _dispatch as dsp

_NAME = "head_sparse_attention"
_HI = jax.lax.Precision.HIGHEST
_NEG = -1e30  # finite: an all-masked row gives p = 0, never inf - inf
TPU_BLOCK_S = 512  # cache slots per TPU grid step (a multiple of 128, or all of S)


def head_mask_from_indices(heads_BxK: jax.Array, num_heads: int) -> jax.Array:
    """[B, k] int head indices -> int32 mask [B, H] (1 = selected)."""
    onehot = jax.nn.one_hot(heads_BxK, num_heads, dtype=jnp.int32)
    return jnp.max(onehot, axis=1)


def _dims(q, head_mask, k_cache, v_cache, kv_valid) -> tuple[int, int, int, int, int]:
    """Validate shapes; return (B, H, Hkv, S, Dh)."""
    n = _NAME
    dsp.check_ndim(n, "q_BxHxDh", q, 3, "[B, H, Dh]")
    dsp.check_ndim(n, "head_mask_BxH", head_mask, 2, "[B, H]")
    dsp.check_ndim(n, "k_cache_BxKxSxDh", k_cache, 4, "[B, Hkv, S, Dh]")
    dsp.check_ndim(n, "kv_valid_BxS", kv_valid, 2, "[B, S]")
    for name, a in (("q_BxHxDh", q), ("k_cache_BxKxSxDh", k_cache), ("v_cache_BxKxSxDh", v_cache)):
        dsp.check_float(n, name, a)
    B, H, Dh = q.shape
    _, Hkv, S, _ = k_cache.shape
    if v_cache.shape != k_cache.shape:
        raise ValueError(
            f"{n}: shape mismatch: v_cache {v_cache.shape} != k_cache {k_cache.shape}."
        )
    dsp.check_dim(n, "head_mask_BxH.shape", tuple(head_mask.shape), (B, H))
    dsp.check_dim(n, "k_cache.shape[0] (B)", k_cache.shape[0], B)
    dsp.check_dim(n, "k_cache.shape[3] (Dh)", k_cache.shape[3], Dh)
    dsp.check_dim(n, "kv_valid_BxS.shape", tuple(kv_valid.shape), (B, S))
    if H % Hkv:
        raise ValueError(f"{n}: H={H} query heads is not a multiple of Hkv={Hkv} kv heads.")
    return B, H, Hkv, S, Dh


def _checked(q, head_mask, k_cache, v_cache, kv_valid, kv_len, scale, threshold):
    """What both entry points check and derive from their arguments (q may be a
    ShapeDtypeStruct): (the scale as a float, kv_len as `_kv_len` clips it, the threshold
    as [H, Dh] float32 or None)."""
    _B, H, _Hkv, S, Dh = _dims(q, head_mask, k_cache, v_cache, kv_valid)
    scale = float(Dh**-0.5 if scale is None else scale)
    t = None if threshold is None else threshold_per_head(threshold, H, Dh)
    return scale, _kv_len(kv_len, S), t


def _slot(slot: Any, S: int, name: str) -> jax.Array:
    """The new token's cache slot as int32 [1], clamped to [0, S - 1] as
    `jax.lax.dynamic_update_slice` clamps its start."""
    slot = jnp.asarray(slot, jnp.int32)
    if slot.ndim:
        raise ValueError(f"{_NAME}: {name} must be a scalar, got shape {slot.shape}.")
    return jnp.clip(slot, 0, S - 1).reshape(1)


def _kv_len(kv_len: Any, S: int) -> jax.Array:
    """Slots scanned, as int32 in [1, S] (slot 0 is always scanned)."""
    n = jnp.asarray(S if kv_len is None else kv_len, jnp.int32)
    if n.ndim:
        raise ValueError(f"{_NAME}: kv_len must be a scalar, got shape {n.shape}.")
    return jnp.clip(n, 1, S)


# ----------------------------------------------------------------------- reference


def head_sparse_attention_reference(
    q_BxHxDh: jax.Array,
    head_mask_BxH: jax.Array,
    k_cache_BxKxSxDh: jax.Array,
    v_cache_BxKxSxDh: jax.Array,
    kv_valid_BxS: jax.Array,
    *,
    kv_len: Any = None,
    scale: float | None = None,
    threshold: Any = None,
    **_blocks: Any,
) -> jax.Array:
    """Every head computed densely in float32, unselected heads zeroed, o in q.dtype;
    then `threshold` applied (see the module docstring)."""
    B, H, Hkv, S, Dh = _dims(
        q_BxHxDh, head_mask_BxH, k_cache_BxKxSxDh, v_cache_BxKxSxDh, kv_valid_BxS
    )
    scale = Dh**-0.5 if scale is None else scale
    G = H // Hkv
    q = q_BxHxDh.astype(jnp.float32).reshape(B, Hkv, G, Dh)
    k = k_cache_BxKxSxDh.astype(jnp.float32)
    v = v_cache_BxKxSxDh.astype(jnp.float32)
    s = jnp.einsum("bkgd,bksd->bkgs", q, k, precision=_HI) * scale
    valid = (kv_valid_BxS != 0) & (jnp.arange(S) < _kv_len(kv_len, S))[None, :]
    s = jnp.where(valid[:, None, None, :], s, -jnp.inf)
    p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    p = jnp.where(valid[:, None, None, :], p, 0.0)
    den = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bkgs,bksd->bkgd", p, v, precision=_HI) / jnp.where(den > 0, den, 1.0)
    o = o.reshape(B, H, Dh)
    o = jnp.where((head_mask_BxH != 0)[:, :, None], o, 0.0).astype(q_BxHxDh.dtype)
    if threshold is None:
        return o
    return _keep_at_threshold(o, threshold_per_head(threshold, H, Dh)[None])


def _keep_at_threshold(o: jax.Array, t: jax.Array) -> jax.Array:
    """`o` where `abs(o) >= t`, else 0, compared in o's dtype with `t` rounded to it
    (`jaxsparse.rules.sparsify`'s rule); the reference, both kernels and the split
    merge apply it alike."""
    return jnp.where(jnp.abs(o) >= t.astype(o.dtype), o, jnp.zeros((), o.dtype))


def threshold_per_head(threshold: Any, H: int, Dh: int) -> jax.Array:
    """`threshold` (scalar, [H * Dh] or [H, Dh]) as float32 [H, Dh]: the layout the
    kernels take, and the one a caller splits by heads (`jaxsparse.models.attention`)."""
    t = jnp.asarray(threshold, jnp.float32)
    if t.shape not in ((), (H * Dh,), (H, Dh)):
        raise ValueError(
            f"{_NAME}: threshold has shape {t.shape}; use a scalar, [H * Dh] = [{H * Dh}] or "
            f"[H, Dh] = [{H}, {Dh}] (one per output channel)."
        )
    return jnp.broadcast_to(t.reshape(H, Dh) if t.ndim else t, (H, Dh))


# ------------------------------------------------------------------------ GPU (Triton)


def _group_rows(G: int) -> int:
    """Rows of the tensor-core tile that holds a kv head's G query heads (at least 16)."""
    return max(16, pl.next_power_of_2(G))


def _row(x: jax.Array, rows: jax.Array, g: jax.Array) -> jax.Array:
    """Row g of the [Gp, ...] tile `x` (a masked sum: no dynamic row indexing in Triton)."""
    sel = (rows == g).reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.sum(jnp.where(sel, x, 0.0), axis=0)


def _parts(Dh: int, rope: bool) -> list[tuple[int, int]]:
    """(offset, width) of the column parts a head vector is held in: its two halves under
    RoPE (rotate-half pairs column i with i + Dh/2, and Triton cannot swap them inside a
    vector, so each half is loaded and dotted apart), else the whole vector."""
    return [(0, Dh // 2), (Dh // 2, Dh // 2)] if rope else [(0, Dh)]


class _Refs:
    """The GPU kernel's refs by name, from the flat list `pallas_call` passes (inputs,
    then outputs; the order `_head_sparse_attention_gpu` builds)."""

    def __init__(self, refs, *, packed, rope, thresholded, writes_kv, split):
        refs = list(refs)
        take = lambda on: refs.pop(0) if on else None
        self.q, self.hm, self.valid, self.len, self.k, self.v = (refs.pop(0) for _ in range(6))
        self.kv = take(packed)  # where k and v are (packed: maybe q's array again)
        self.t = take(thresholded)
        self.k_new, self.v_new = take(writes_kv and not packed), take(writes_kv and not packed)
        self.cos, self.sin = take(rope), take(rope)
        self.slot = take(writes_kv)
        self.o = take(not split)
        self.ml, self.acc = take(split), take(split)
        self.k_out, self.v_out = take(writes_kv), take(writes_kv)
        assert not refs, f"{len(refs)} refs left over"


def _head_vectors(r: _Refs, b, kvh, *, G, Dh, packed, rope, layout, qdt):
    """The kv head's G query vectors, and the new token's k and v (None when the kernel
    writes none), as lists of float32 column parts (`_parts`).

    Packed (`layout` = (q_col, q_stride, kv_col, kv_stride)): q, k and v are read from the
    projections' outputs, row `b` of `r.q` and `r.kv` ([rows, width], any float dtype):
    kv head `kvh`'s G q heads side by side from column `q_col + kvh * q_stride`, its k and
    v from `kv_col + kvh * kv_stride`; rounded to `qdt` as the model rounds its
    projections; under RoPE q and k are then rotated in float32 and rounded again
    (`jaxsparse.models.layers.apply_rope`'s steps), k and v finally to the cache's dtype.
    Otherwise q comes from `r.q` [B, H, Dh] and k/v from `r.k_new`/`r.v_new`."""
    parts = _parts(Dh, rope)
    f32 = jnp.float32
    cdt = r.k.dtype

    def rounded(x, dt):
        return x.astype(dt).astype(f32)

    def rotated(xs, dt):
        if not rope:
            return xs
        (c0, w), (c1, _) = parts
        cos = [r.cos[b, pl.ds(c0, w)], r.cos[b, pl.ds(c1, w)]]
        sin = [r.sin[b, pl.ds(c0, w)], r.sin[b, pl.ds(c1, w)]]
        lo, hi = xs
        return [rounded(lo * cos[0] - hi * sin[0], dt), rounded(hi * cos[1] + lo * sin[1], dt)]

    if packed:
        q_col, q_stride, kv_col, kv_stride = layout
        q_base, kv_base = q_col + kvh * q_stride, kv_col + kvh * kv_stride

        def vec(ref, start, ps=parts):  # Dh values from column `start` on, by parts
            return [rounded(ref[b, pl.ds(start + off, w)], qdt) for off, w in ps]

        qs = [rotated(vec(r.q, q_base + g * Dh), qdt) for g in dsp.static_indices(G)]
        if r.slot is None:
            return qs, None
        k_new = [rounded(x, cdt) for x in rotated(vec(r.kv, kv_base), qdt)]
        v_new = [rounded(x, cdt) for x in vec(r.kv, kv_base + Dh, [(0, Dh)])]  # v: whole
        return qs, (k_new, v_new)
    qs = [[r.q[b, kvh * G + g, :].astype(f32)] for g in dsp.static_indices(G)]
    if r.slot is None:
        return qs, None
    return qs, ([r.k_new[b, kvh, :].astype(f32)], [r.v_new[b, kvh, :].astype(f32)])


def _online_softmax(r: _Refs, b, kvh, chunks, qs, new, *, G, Dh, S, block_s, scale, rope):
    """The running max m [Gp], sum l [Gp] and unnormalized output acc [Gp, Dh] of kv head
    `kvh`'s G query heads `qs` (rows 0..G-1 of a Gp-row tile; the rows past G hold zero
    queries and are dropped) over slot chunks `chunks(n_chunks) -> (first, stop)`, with
    the heads, their selection and the tile's row ids. `new` = (k parts, v parts): the
    new token's k and v, read in place of the cache's rows at its slot (which the kernel
    writes them into; `_write_new_kv`).

    The G heads share each K/V chunk: scores are one [Gp, Dh] x [block_s, Dh]^T dot (one
    per column part under RoPE, summed) and the output one [Gp, block_s] x [block_s, Dh]
    dot on the tensor cores, with p in the cache's dtype for the second (float32 caches:
    no TF32), and two row reductions per chunk (max and sum). The first version reduced
    over the chunk's elements per head instead, five cross-thread reductions per head per
    chunk, and took 17 us per call on an H200 where XLA's attention took about 8
    (benchmarks/NOTES_kernels.md)."""
    gs = dsp.static_indices(G)
    heads = [kvh * G + g for g in gs]
    sel = [r.hm[b, h] != 0 for h in heads]
    any_sel = sel[0]
    for s_ in sel[1:]:
        any_sel = any_sel | s_
    length = jnp.minimum(r.len[0], S)
    n_chunks = jnp.where(any_sel, (length + block_s - 1) // block_s, 0)
    first, stop = chunks(n_chunks)
    Gp = _group_rows(G)
    rows = jnp.arange(Gp, dtype=jnp.int32)
    dot_dtype = r.k.dtype if r.k.dtype == r.v.dtype else jnp.float32
    parts = _parts(Dh, rope)
    q_tiles = []
    for p, (_, w) in enumerate(parts):
        q = jnp.zeros((Gp, w), jnp.float32)
        for g, qg in zip(gs, qs):
            q = jnp.where((rows == g)[:, None], qg[p][None, :], q)
        q_tiles.append(q.astype(dot_dtype))
    slot = None if new is None else r.slot[0]

    def body(c, carry):
        m_old, l_old, acc_old = carry
        s0 = c * block_s
        in_range = (s0 + jnp.arange(block_s)) < length
        ok = dsp.masked_load(r.valid.at[b, pl.ds(s0, block_s)], in_range, 0) != 0
        ks = []  # invalid slots are not read
        for off, w in parts:
            mask = jnp.broadcast_to(ok[:, None], (block_s, w))
            ks.append(dsp.masked_load(r.k.at[b, kvh, pl.ds(s0, block_s), pl.ds(off, w)], mask, 0.0))
        mask = jnp.broadcast_to(ok[:, None], (block_s, Dh))
        v = dsp.masked_load(r.v.at[b, kvh, pl.ds(s0, block_s), :], mask, 0.0)
        if new is not None:
            at_new = ((s0 + jnp.arange(block_s)) == slot)[:, None]
            ks = [jnp.where(at_new, kn[None, :].astype(k.dtype), k) for k, kn in zip(ks, new[0])]
            v = jnp.where(at_new, new[1][0][None, :].astype(v.dtype), v)
        sc = None
        for q, k in zip(q_tiles, ks):
            d = dsp.triton_dot(q, k.astype(dot_dtype), trans_b=True)  # [Gp, block_s]
            sc = d if sc is None else sc + d
        sc = jnp.where(ok[None, :], sc * scale, _NEG)
        m_new = jnp.maximum(m_old, jnp.max(sc, axis=1))
        alpha = jnp.exp(m_old - m_new)
        p = jnp.where(ok[None, :], jnp.exp(sc - m_new[:, None]), 0.0)
        pv = dsp.triton_dot(p.astype(dot_dtype), v.astype(dot_dtype))  # [Gp, Dh]
        return m_new, l_old * alpha + jnp.sum(p, axis=1), acc_old * alpha[:, None] + pv

    init = (
        jnp.full((Gp,), _NEG, jnp.float32),
        jnp.zeros((Gp,), jnp.float32),
        jnp.zeros((Gp, Dh), jnp.float32),
    )
    return heads, sel, rows, jax.lax.fori_loop(first, stop, body, init)


def _write_new_kv(r: _Refs, new, b, kvh, owner, parts) -> None:
    """The new token's k and v written into the caches (outputs aliased to the cache
    inputs: every other slot keeps its value) at its slot, by the one program `owner`
    picks among those of (row, kv head) (None: the only one). Kv heads that no selected
    query head reads get it too: the cache must hold every token for later steps."""

    def write():
        slot = r.slot[0]
        for (off, w), kn in zip(parts, new[0]):
            r.k_out[b, kvh, slot, pl.ds(off, w)] = kn.astype(r.k_out.dtype)
        r.v_out[b, kvh, slot, :] = new[1][0].astype(r.v_out.dtype)

    if owner is None:
        write()
    else:
        pl.when(owner)(write)


def _gpu_kernel(
    *refs,
    G,
    Dh,
    S,
    block_s,
    scale,
    thresholded,
    writes_kv,
    packed,
    rope,
    layout,
    qdt,
    per_split,
):
    """One program per (row, kv head) (`per_split` None), or per (row, kv head, slot
    range of `per_split` chunks), which writes each head's running max and sum
    (`ml[b, split, h] = (m, l)`) and unnormalized output for `_merge_splits`."""
    split_mode = per_split is not None
    r = _Refs(
        refs,
        packed=packed,
        rope=rope,
        thresholded=thresholded,
        writes_kv=writes_kv,
        split=split_mode,
    )
    b = pl.program_id(0)
    kvh = pl.program_id(1)
    split = pl.program_id(2) if split_mode else None
    dims = {"G": G, "Dh": Dh}
    qs, new = _head_vectors(r, b, kvh, **dims, packed=packed, rope=rope, layout=layout, qdt=qdt)
    if split_mode:

        def chunks(n):
            first = jnp.minimum(split * per_split, n)
            return first, jnp.minimum(first + per_split, n)

    else:
        chunks = lambda n: (0, n)
    heads, sel, rows, (m, l, acc) = _online_softmax(
        r, b, kvh, chunks, qs, new, **dims, S=S, block_s=block_s, scale=scale, rope=rope
    )
    if split_mode:
        two = jnp.arange(2)
        for g, h in enumerate(heads):
            r.ml[b, split, h, :] = jnp.where(two == 0, _row(m, rows, g), _row(l, rows, g))
            r.acc[b, split, h, :] = _row(acc, rows, g)
    else:
        o_all = acc / jnp.where(l > 0, l, 1.0)[:, None]  # no slot: acc = 0
        for g, h in enumerate(heads):
            o = jnp.where(sel[g], _row(o_all, rows, g), 0.0)
            o = o.astype(r.o.dtype)
            if thresholded:
                o = _keep_at_threshold(o, r.t[h, :])
            r.o[b, h, :] = o
    if writes_kv:  # in split mode, by the slot range that holds the new slot
        owner = None if not split_mode else split == r.slot[0] // block_s // per_split
        _write_new_kv(r, new, b, kvh, owner, _parts(Dh, rope))


def _merge_splits(ml_BxPxHx2, acc_BxPxHxDh, hm_BxH, t_HxDh, dtype):
    """The split programs' softmax pieces merged: o = sum_p e^(m_p - M) acc_p / sum_p
    e^(m_p - M) l_p (0 where no slot was valid), unselected heads 0, then the threshold."""
    m, l = ml_BxPxHx2[..., 0], ml_BxPxHx2[..., 1]
    w = jnp.exp(m - jnp.max(m, axis=1, keepdims=True))  # an empty split: m = _NEG, l = 0
    den = jnp.sum(w * l, axis=1)
    o = jnp.sum(w[..., None] * acc_BxPxHxDh, axis=1) / jnp.where(den > 0, den, 1.0)[..., None]
    o = jnp.where((hm_BxH != 0)[..., None], o, 0.0).astype(dtype)
    if t_HxDh is None:
        return o
    return _keep_at_threshold(o, t_HxDh[None])


@functools.partial(
    jax.jit,
    static_argnames=(
        "scale",
        "block_s",
        "num_warps",
        "num_stages",
        "num_splits",
        "interpret",
        "layout",
        "num_heads",
        "dtype",
    ),
)
def _head_sparse_attention_gpu(
    q,
    hm_BxH,
    k_cache,
    v_cache,
    valid_BxS,
    kv_len,
    t_HxDh=None,
    new_kv=None,
    rope=None,
    slot=None,
    kv_src=None,
    *,
    scale,
    block_s=64,
    num_warps=4,
    num_stages=2,
    num_splits=1,
    interpret=False,
    layout=None,
    num_heads=None,
    dtype=None,
):
    """o [B, H, Dh] in `dtype`; with `slot` (int32 [1]), also the caches with the new
    token written there (the cache inputs aliased to those outputs: XLA updates them in
    place, as it does a dynamic_update_slice).

    Two ways in: `q` [B, H, Dh] with the new token's `new_kv` = (k_new, v_new) [B, Hkv,
    Dh] (or none, `slot` None); or packed (`layout` given): `q` and `kv_src` are the
    projections' outputs [rows, width] (`_head_vectors`), with `rope` = (cos, sin) [B, Dh]
    float32 or None, `num_heads` and `dtype` (the model's)."""
    packed = layout is not None
    B, Hkv, S, Dh = k_cache.shape
    H = num_heads if packed else q.shape[1]
    dtype = jnp.dtype(dtype if packed else q.dtype)
    dsp.check_block(_NAME, "block_s", block_s, power_of_2=True)
    dsp.check_block(_NAME, "head dim Dh", Dh, power_of_2=True)
    dsp.check_block(_NAME, "num_splits", num_splits, power_of_2=False)
    if not interpret and min(Dh // (2 if rope is not None else 1), block_s) < 16:
        raise ValueError(
            f"{_NAME}: the GPU kernel's tensor-core dots need head dim Dh >= 16 (32 with "
            f"RoPE inside) and block_s >= 16, got Dh={Dh}, block_s={block_s}; pass a larger "
            "block_s, or impl='reference' for a model with smaller heads."
        )
    writes_kv = slot is not None
    split_mode = num_splits > 1
    per_split = -(-pl.cdiv(S, block_s) // num_splits) if split_mode else None
    thresholded = t_HxDh is not None and not split_mode  # split mode: the merge applies it
    kernel = functools.partial(
        _gpu_kernel,
        G=H // Hkv,
        Dh=Dh,
        S=S,
        block_s=block_s,
        scale=scale,
        thresholded=thresholded,
        writes_kv=writes_kv,
        packed=packed,
        rope=rope is not None,
        layout=layout,
        qdt=dtype,
        per_split=per_split,
    )
    inputs = [
        q,
        (hm_BxH != 0).astype(jnp.int32),
        (valid_BxS != 0).astype(jnp.int32),
        kv_len.reshape(1),
        k_cache,
        v_cache,
    ]
    inputs += [kv_src] if packed else []
    inputs += [t_HxDh] if thresholded else []
    inputs += list(new_kv) if writes_kv and not packed else []
    inputs += list(rope) if rope is not None else []
    inputs += [slot] if writes_kv else []
    if split_mode:
        outs = [
            jax.ShapeDtypeStruct((B, num_splits, H, 2), jnp.float32),
            jax.ShapeDtypeStruct((B, num_splits, H, Dh), jnp.float32),
        ]
    else:
        outs = [jax.ShapeDtypeStruct((B, H, Dh), dtype)]
    n_out = len(outs)
    if writes_kv:
        outs += [jax.ShapeDtypeStruct(c.shape, c.dtype) for c in (k_cache, v_cache)]
    res = pl.pallas_call(
        kernel,
        out_shape=tuple(outs),
        grid=(B, Hkv, num_splits) if split_mode else (B, Hkv),
        input_output_aliases={4: n_out, 5: n_out + 1} if writes_kv else {},
        compiler_params=dsp.triton_compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="head_sparse_attention_split" if split_mode else "head_sparse_attention",
    )(*inputs)
    o = _merge_splits(res[0], res[1], hm_BxH, t_HxDh, dtype) if split_mode else res[0]
    return (o, res[n_out], res[n_out + 1]) if writes_kv else o


# ------------------------------------------------------------------------ TPU (Mosaic)


def _tpu_kernel(
    kvl_ref,
    cnt_ref,
    nblk_ref,
    len_ref,
    hm_ref,
    q_ref,
    k_ref,
    v_ref,
    valid_ref,
    *refs,
    G,
    H,
    S,
    block_s,
    scale,
    thresholded,
):
    t_ref, o_ref, m_ref, l_ref, acc_ref = refs if thresholded else (None, *refs)
    b = pl.program_id(0)
    j = pl.program_id(1)
    s = pl.program_id(2)
    active = (j < cnt_ref[b]) & (s < nblk_ref[0])

    @pl.when((j == 0) & (s == 0))
    def _():
        o_ref[...] = jnp.zeros_like(o_ref)  # kv heads no selected query head needs

    @pl.when(active & (s == 0))
    def _():
        m_ref[...] = jnp.full_like(m_ref, _NEG)
        l_ref[...] = jnp.zeros_like(l_ref)
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(active)
    def _():
        pos_1xS = s * block_s + jax.lax.broadcasted_iota(jnp.int32, (1, block_s), 1)
        pos_Sx1 = s * block_s + jax.lax.broadcasted_iota(jnp.int32, (block_s, 1), 0)
        limit = jnp.minimum(len_ref[0], S)
        ok = (valid_ref[...] != 0) & (pos_1xS < limit)  # [1, block_s]
        q = q_ref[...].astype(jnp.float32)  # [G, Dh]
        k = k_ref[...].astype(jnp.float32)  # [block_s, Dh]
        # Rows past kv_len (or past S, where a last block hangs over the array) may hold
        # anything: zero them before the dots. Invalid slots below kv_len get p = 0; their
        # cache rows are copied with the block, so they must be finite (the model's are).
        k = jnp.where(pos_Sx1 < limit, k, 0.0)
        v = jnp.where(pos_Sx1 < limit, v_ref[...].astype(jnp.float32), 0.0)
        sc = (
            jax.lax.dot_general(
                q, k, (((1,), (1,)), ((), ())), precision=_HI, preferred_element_type=jnp.float32
            )
            * scale
        )  # [G, block_s]
        sc = jnp.where(ok, sc, _NEG)
        m_prev = m_ref[...]  # [G, 128], lane-replicated
        m_next = jnp.maximum(m_prev, jnp.max(sc, axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_next)
        p = jnp.where(ok, jnp.exp(sc - m_next[:, :1]), 0.0)
        l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
        m_ref[...] = m_next
        acc_ref[...] = alpha[:, :1] * acc_ref[...] + jnp.dot(
            p, v, precision=_HI, preferred_element_type=jnp.float32
        )

    @pl.when(active & (s == nblk_ref[0] - 1))
    def _():
        kvh = kvl_ref[b, j]
        row = jax.lax.broadcasted_iota(jnp.int32, (G, 1), 0)
        sel = jnp.zeros((G, 1), jnp.bool_)
        for g in range(G):
            sel = jnp.where(row == g, hm_ref[b * H + kvh * G + g] != 0, sel)
        l_col = l_ref[...][:, :1]
        o = acc_ref[...] / jnp.where(l_col > 0, l_col, 1.0)
        o = jnp.where(sel, o, 0.0).astype(o_ref.dtype)
        if thresholded:
            o = _keep_at_threshold(o, t_ref[kvh])
        o_ref[kvh] = o


def _needed_kv_heads(hm_BxH: jax.Array, Hkv: int) -> tuple[jax.Array, jax.Array]:
    """Per batch row: the kv heads some selected query head reads, ascending, then the
    last of them repeated (head 0 when none); and their count. int32 [B, Hkv], [B]."""
    B, H = hm_BxH.shape
    need = jnp.any((hm_BxH != 0).reshape(B, Hkv, H // Hkv), axis=2)
    ids = jnp.arange(Hkv, dtype=jnp.int32)
    order = jnp.argsort(jnp.where(need, ids, ids + Hkv), axis=1, stable=True).astype(jnp.int32)
    cnt = jnp.sum(need.astype(jnp.int32), axis=1)
    last = jnp.take_along_axis(order, jnp.maximum(cnt - 1, 0)[:, None], axis=1)
    return jnp.where(ids[None, :] < cnt[:, None], order, last), cnt


def tpu_block_s(S: int, block_s: int | None) -> int:
    """Slots per TPU step: S itself when it fits one block, else a multiple of 128 (the
    `kv_valid` block's lane width)."""
    block_s = TPU_BLOCK_S if block_s is None else block_s
    if block_s >= S:
        return S
    if block_s <= 0 or block_s % 128:
        raise ValueError(
            f"{_NAME}: block_s={block_s} must be a multiple of 128 (or >= S={S}) for the TPU "
            "kernel."
        )
    return block_s


@functools.partial(jax.jit, static_argnames=("scale", "block_s", "interpret"))
def _head_sparse_attention_tpu(
    q_BxHxDh,
    hm_BxH,
    k_cache,
    v_cache,
    valid_BxS,
    kv_len,
    t_HxDh=None,
    *,
    scale,
    block_s=None,
    interpret=False,
):
    B, H, Dh = q_BxHxDh.shape
    _, Hkv, S, _ = k_cache.shape
    G = H // Hkv
    bs = tpu_block_s(S, block_s)
    kvl, cnt = _needed_kv_heads(hm_BxH, Hkv)
    nblk = jnp.maximum((kv_len + bs - 1) // bs, 1).astype(jnp.int32).reshape(1)
    hm_flat = (hm_BxH != 0).astype(jnp.int32).reshape(B * H)
    valid = (valid_BxS != 0).astype(jnp.int32).reshape(B, 1, S)

    def kv_map(b, j, s, kvl, cnt, nblk, ln, hm):
        return (b, kvl[b, j], jnp.minimum(s, nblk[0] - 1), 0)

    thresholded = t_HxDh is not None
    kernel = functools.partial(
        _tpu_kernel, G=G, H=H, S=S, block_s=bs, scale=scale, thresholded=thresholded
    )
    # the whole [Hkv, G, Dh] threshold, one block for every step (indexed by kv head)
    t_spec = pl.BlockSpec((Hkv, G, Dh), lambda b, j, s, kvl, cnt, nblk, ln, hm: (0, 0, 0))
    grid_spec = dsp.prefetch_grid_spec(
        num_scalar_prefetch=5,
        grid=(B, Hkv, pl.cdiv(S, bs)),
        in_specs=[
            pl.BlockSpec(
                (None, None, G, Dh), lambda b, j, s, kvl, cnt, nblk, ln, hm: (b, kvl[b, j], 0, 0)
            ),
            pl.BlockSpec((None, None, bs, Dh), kv_map),
            pl.BlockSpec((None, None, bs, Dh), kv_map),
            pl.BlockSpec(
                (None, 1, bs),
                lambda b, j, s, kvl, cnt, nblk, ln, hm: (b, 0, jnp.minimum(s, nblk[0] - 1)),
            ),
            *([t_spec] if thresholded else []),
        ],
        out_specs=pl.BlockSpec(
            (None, Hkv, G, Dh), lambda b, j, s, kvl, cnt, nblk, ln, hm: (b, 0, 0, 0)
        ),
        scratch_shapes=[
            dsp.vmem((G, 128), jnp.float32),
            dsp.vmem((G, 128), jnp.float32),
            dsp.vmem((G, Dh), jnp.float32),
        ],
    )
    o = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((B, Hkv, G, Dh), q_BxHxDh.dtype),
        grid_spec=grid_spec,
        compiler_params=dsp.tpu_compiler_params(("parallel", "arbitrary", "arbitrary")),
        interpret=dsp.tpu_interpret_params() if interpret else False,
        name="head_sparse_attention_tpu",
    )(
        kvl,
        cnt,
        nblk,
        kv_len.reshape(1),
        hm_flat,
        q_BxHxDh.reshape(B, Hkv, G, Dh),
        k_cache,
        v_cache,
        valid,
        *([t_HxDh.reshape(Hkv, G, Dh)] if thresholded else []),
    )
    return o.reshape(B, H, Dh)


# ------------------------------------------------------------------------ dispatcher


def head_sparse_attention(
    q_BxHxDh: jax.Array,
    head_mask_BxH: jax.Array,
    k_cache_BxKxSxDh: jax.Array,
    v_cache_BxKxSxDh: jax.Array,
    kv_valid_BxS: jax.Array,
    *,
    kv_len: Any = None,
    scale: float | None = None,
    impl: str = "auto",
    block_s: int | None = None,
    threshold: Any = None,
    new_kv: tuple[jax.Array, jax.Array, Any] | None = None,
    **kernel_options: Any,
) -> jax.Array | tuple[jax.Array, jax.Array, jax.Array]:
    """Decode-step attention of the selected query heads over a `[B, Hkv, S, Dh]` cache.

    Args:
      q_BxHxDh: the new token's queries (RoPE applied); unselected heads' rows are ignored.
      head_mask_BxH: nonzero where a query head is selected (bool/int/float).
      k_cache_BxKxSxDh, v_cache_BxKxSxDh: the caches, the new token's k/v already written
        (unless `new_kv` brings them).
      kv_valid_BxS: nonzero where the token may attend the slot (causal, not padding).
      kv_len: int scalar (may be traced): slots >= kv_len are neither read nor attended
        (default S).
      scale: score scale (default Dh ** -0.5).
      impl: "auto", "reference", "gpu", "tpu", "gpu_interpret", "tpu_interpret".
      block_s: cache slots per step (GPU: a power of 2; TPU: a multiple of 128).
      threshold: None, or a float threshold per output channel (a scalar, [H * Dh] in the
        merged heads' order, or [H, Dh]): entries with `abs(o) < threshold` (threshold
        rounded to q.dtype) come out as 0.
      new_kv: None, or (k_new [B, Hkv, Dh], v_new [B, Hkv, Dh], slot): the new token's
        k and v, written into the caches at cache slot `slot` (an int scalar, may be
        traced; clamped to [0, S - 1] as `jax.lax.dynamic_update_slice` clamps) before
        attending, so the caches passed need not hold them yet. The GPU kernel writes them
        itself (the caches come back updated in place, no update kernels of their own);
        the reference and the TPU path update the caches with a dynamic_update_slice.
      kernel_options: GPU only: num_warps, num_stages, num_splits (slot ranges run by
        programs of their own, merged afterwards; default 1).

    Returns:
      o [B, H, Dh] in q.dtype: attention outputs of the selected heads, zeros elsewhere;
      with `new_kv`, the tuple (o, k_cache, v_cache) with the new token written.
    """
    which = dsp.resolve_impl(impl, fn_name=_NAME)
    scale, n, t = _checked(
        q_BxHxDh,
        head_mask_BxH,
        k_cache_BxKxSxDh,
        v_cache_BxKxSxDh,
        kv_valid_BxS,
        kv_len,
        scale,
        threshold,
    )
    new = None if new_kv is None else _new_kv_args(new_kv, k_cache_BxKxSxDh, v_cache_BxKxSxDh)
    if which in ("gpu", "gpu_interpret"):
        extra = {} if block_s is None else {"block_s": block_s}
        args = (q_BxHxDh, head_mask_BxH, k_cache_BxKxSxDh, v_cache_BxKxSxDh, kv_valid_BxS)
        return _head_sparse_attention_gpu(
            *args,
            n,
            t,
            None if new is None else new[:2],
            None,
            None if new is None else new[2],
            scale=scale,
            interpret=which == "gpu_interpret",
            **extra,
            **kernel_options,
        )
    if kernel_options:
        raise ValueError(f"{_NAME}: options {sorted(kernel_options)} apply to the GPU kernel only.")
    kc, vc = k_cache_BxKxSxDh, v_cache_BxKxSxDh
    if new is not None:
        kc, vc = (
            jax.lax.dynamic_update_slice_in_dim(c, x[:, :, None], new[2][0], axis=2)
            for c, x in ((kc, new[0]), (vc, new[1]))
        )
    args = (q_BxHxDh, head_mask_BxH, kc, vc, kv_valid_BxS)
    if which == "reference":
        o = head_sparse_attention_reference(*args, kv_len=n, scale=scale, threshold=t)
    else:
        extra = {} if block_s is None else {"block_s": block_s}
        o = _head_sparse_attention_tpu(
            *args, n, t, scale=scale, interpret=which == "tpu_interpret", **extra
        )
    return o if new is None else (o, kc, vc)


def _new_kv_args(new_kv: Any, k_cache: jax.Array, v_cache: jax.Array) -> tuple:
    """`new_kv` checked and laid out for the kernels: (k_new, v_new) in the caches'
    dtypes, and the slot as int32 [1] clamped to [0, S - 1]."""
    if not (isinstance(new_kv, (tuple, list)) and len(new_kv) == 3):
        raise ValueError(
            f"{_NAME}: new_kv must be (k_new [B, Hkv, Dh], v_new [B, Hkv, Dh], slot), got "
            f"{type(new_kv).__name__}."
        )
    k_new, v_new, slot = new_kv
    B, Hkv, S, Dh = k_cache.shape
    for name, x in (("new_kv k_new", k_new), ("new_kv v_new", v_new)):
        dsp.check_ndim(_NAME, name, x, 3, "[B, Hkv, Dh]")
        dsp.check_dim(_NAME, f"{name}.shape", tuple(x.shape), (B, Hkv, Dh))
    return k_new.astype(k_cache.dtype), v_new.astype(v_cache.dtype), _slot(slot, S, "new_kv's slot")


def rope_rotate_half(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """HF Llama's rotate-half RoPE of x [..., Dh] in float32, cos/sin broadcasting
    against it, rounded back to x's dtype (the steps of
    `jaxsparse.models.layers.apply_rope`; the packed GPU kernel takes them too)."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


def head_sparse_attention_from_qkv(
    qkv_BxW: jax.Array,
    qkv_col: int,
    head_mask_BxH: jax.Array,
    k_cache_BxKxSxDh: jax.Array,
    v_cache_BxKxSxDh: jax.Array,
    kv_valid_BxS: jax.Array,
    slot: Any,
    *,
    num_heads: int,
    dtype: Any,
    kv: tuple[jax.Array, int] | None = None,
    rope: tuple[jax.Array, jax.Array] | None = None,
    kv_len: Any = None,
    scale: float | None = None,
    impl: str = "auto",
    block_s: int | None = None,
    threshold: Any = None,
    **kernel_options: Any,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A decode step's attention straight from the q/k/v projections' outputs: the new
    token's q, k and v sliced, rounded to `dtype`, RoPE applied to q and k, k and v
    written into the caches at `slot`, then `head_sparse_attention` over them.

    The GPU kernel does all of it in the attention's own launch (no slice, RoPE or
    cache-update kernels around it): it reads q, k and v in place, where the projections
    left them (e.g. a wider float32 accumulator they were added into). Two layouts, the
    models': one fused q|k|v output from column `qkv_col` of `qkv_BxW`, each kv head's G
    q heads, its k and its v side by side (`[Hkv, G + 2, Dh]`); or, with `kv=(kv_BxW,
    kv_col)`, q alone there (`[H, Dh]`) and k|v from column `kv_col` of `kv_BxW`
    (`[Hkv, 2, Dh]`: k then v per kv head; it may be `qkv_BxW` itself). The reference and
    the TPU path slice and rotate with jnp and call `head_sparse_attention(new_kv=...)`.

    Args:
      qkv_BxW: float array [rows >= B, W]; row b holds batch row b's projection output
        (f32 straight from a matmul, or already in `dtype`).
      qkv_col: static int, the first column of q|k|v (or of q, with `kv`) in `qkv_BxW`.
      slot: int scalar (may be traced): the cache slot of the new token (clamped to
        [0, S - 1]).
      num_heads: H, the query heads (G = H // Hkv per kv head).
      dtype: the model's dtype: q, k and v are rounded to it before and after RoPE, as
        the model rounds its projections; o comes out in it.
      kv: None (fused q|k|v), or (kv_BxW, kv_col): where k|v are (a static int column).
      rope: None (no rotary embedding, e.g. OPT) or (cos, sin), each [B, Dh] float32 for
        the new token's position.
      The rest as in `head_sparse_attention`.

    Returns:
      (o [B, H, Dh] in `dtype`, k_cache, v_cache): the caches with the new token written.
    """
    which = dsp.resolve_impl(impl, fn_name=_NAME)
    dsp.check_ndim(_NAME, "k_cache_BxKxSxDh", k_cache_BxKxSxDh, 4, "[B, Hkv, S, Dh]")
    B, Hkv, S, Dh = k_cache_BxKxSxDh.shape
    H = int(num_heads)
    if H <= 0 or H % Hkv:
        raise ValueError(f"{_NAME}: num_heads={H} must be a positive multiple of Hkv={Hkv}.")
    G = H // Hkv
    if kv is None:
        sources = [("qkv_BxW", qkv_BxW, "qkv_col", qkv_col, (H + 2 * Hkv) * Dh, "q|k|v")]
        layout = (qkv_col, (G + 2) * Dh, qkv_col + G * Dh, (G + 2) * Dh)
    else:
        if not (isinstance(kv, (tuple, list)) and len(kv) == 2):
            raise ValueError(f"{_NAME}: kv must be (kv_BxW, kv_col), got {type(kv).__name__}.")
        sources = [
            ("qkv_BxW", qkv_BxW, "qkv_col", qkv_col, H * Dh, "q"),
            ("kv_BxW", kv[0], "kv_col", kv[1], 2 * Hkv * Dh, "k|v"),
        ]
        layout = (qkv_col, G * Dh, kv[1], 2 * Dh)
    for name, src, col_name, col, width, what in sources:
        dsp.check_ndim(_NAME, name, src, 2, "[rows, W]")
        dsp.check_float(_NAME, name, src)
        if not isinstance(col, int) or col < 0 or col + width > src.shape[1]:
            raise ValueError(
                f"{_NAME}: {col_name}={col!r}: {what} takes {width} columns from it, and "
                f"{name} has {src.shape[1]}; pass the static column where the projection's "
                "output starts."
            )
        if src.shape[0] < B:
            raise ValueError(f"{_NAME}: {name} has {src.shape[0]} rows, fewer than B={B}.")
    dtype = jnp.dtype(dtype)
    if rope is not None:
        rope = tuple(jnp.asarray(x, jnp.float32) for x in rope)
        for name, x in zip(("rope cos", "rope sin"), rope):
            dsp.check_dim(_NAME, f"{name}.shape", tuple(x.shape), (B, Dh))
    if which not in ("gpu", "gpu_interpret"):
        if kv is None:
            w = (H + 2 * Hkv) * Dh
            blk = qkv_BxW[:B, qkv_col : qkv_col + w].astype(dtype).reshape(B, Hkv, G + 2, Dh)
            q, k, v = blk[:, :, :G].reshape(B, H, Dh), blk[:, :, G], blk[:, :, G + 1]
        else:
            q = qkv_BxW[:B, qkv_col : qkv_col + H * Dh].astype(dtype).reshape(B, H, Dh)
            w = 2 * Hkv * Dh
            kvb = kv[0][:B, kv[1] : kv[1] + w].astype(dtype).reshape(B, Hkv, 2, Dh)
            k, v = kvb[:, :, 0], kvb[:, :, 1]
        if rope is not None:
            q = rope_rotate_half(q, rope[0][:, None], rope[1][:, None])
            k = rope_rotate_half(k, rope[0][:, None], rope[1][:, None])
        return head_sparse_attention(
            q,
            head_mask_BxH,
            k_cache_BxKxSxDh,
            v_cache_BxKxSxDh,
            kv_valid_BxS,
            kv_len=kv_len,
            scale=scale,
            impl=impl,
            block_s=block_s,
            threshold=threshold,
            new_kv=(k, v, slot),
            **kernel_options,
        )
    scale, n, t = _checked(
        jax.ShapeDtypeStruct((B, H, Dh), dtype),
        head_mask_BxH,
        k_cache_BxKxSxDh,
        v_cache_BxKxSxDh,
        kv_valid_BxS,
        kv_len,
        scale,
        threshold,
    )
    extra = {} if block_s is None else {"block_s": block_s}
    return _head_sparse_attention_gpu(
        qkv_BxW,
        head_mask_BxH,
        k_cache_BxKxSxDh,
        v_cache_BxKxSxDh,
        kv_valid_BxS,
        n,
        t,
        None,
        rope,
        _slot(slot, S, "slot"),
        qkv_BxW if kv is None else kv[0],
        scale=scale,
        interpret=which == "gpu_interpret",
        layout=layout,
        num_heads=H,
        dtype=dtype,
        **extra,
        **kernel_options,
    )
