"""Self-attention for every family: q/k/v/o projections, RoPE (Llama family), the KV cache,
and the sparsification points `q_in`, `kv_in` and `o_in` (see `jaxsparse.rules`).

The k/v input has its own threshold: CHESS+ thresholds the q and o inputs but keeps k/v
dense, since a thresholded k/v input damages the cache for every later token.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsparse import rules
from jaxsparse.config import FULL, ModelConfig
from jaxsparse.models.layers import (
    XLA,
    Kernels,
    Linear,
    RMSNorm,
    SharedAccumulator,
    _one_device,
    apply_rope,
    attend,
    attention_mask,
    param_dtype,
    update_layer_cache,
)


def _sparsified(name: str, thresholds: dict | None) -> bool:
    """Whether point `name` has a threshold or a Deja Vu mask in `thresholds`."""
    return thresholds is not None and (name in thresholds or name in thresholds.get("masks", {}))


def _count_zeros(module: nn.Module, name: str, x: jax.Array, fused: bool = False) -> jax.Array:
    """Sows the zero mask of point `name`'s input `x` into "zeros" (the decode loop adds
    them up: an elementwise count, where a reduction per point would be a launch each);
    returns `x`. Only called for points the method sparsifies: natural zeros elsewhere
    are not skipped reads (`jaxsparse evaluate` measures them, "stats").

    While the counts are collected, `x` goes through an optimization barrier, so the
    count reads the array the projection reads. Without it, XLA recomputed `x`'s
    producer inside the loop's count fusion: at batch 4 on a GPU, SiLU(gate) * up again
    from the float32 split-K partials of both GEMMs, 59 MB more reads per 8B step
    (benchmarks/NOTES_kernels.md, "Zero counts"). `fused=True` skips the barrier where
    `x` is an intermediate that XLA fuses into its consumer (the gate's activation, made
    and multiplied by up in one fusion): materializing it would cost a kernel per layer.
    """
    if module.is_mutable_collection("zeros"):
        if not fused:
            x = jax.lax.optimization_barrier(x)
        module.sow("zeros", name, x == 0)
    return x


# The key of a layer's sparsity dict under which a pallas decode block passes the inputs
# its fused norm kernel already thresholded (point name -> array; `Kernels.fused_norms`,
# jaxsparse/models/llama.py); `_sparse` takes them as they are.
APPLIED = "applied"


def _sparse(
    module: nn.Module,
    name: str,
    x: jax.Array,
    thresholds: dict | None,
    fused: bool = False,
    count: bool | None = None,
) -> jax.Array:
    """Applies the threshold of sparsification point `name` and records what it zeroed
    (`thresholds[APPLIED][name]`, where given, is `x` already thresholded). Its zeros
    are counted (`_count_zeros`, `fused` there) if `count`; by default where the point
    is sparsified."""
    module.sow("taps", name, x)
    applied = None if thresholds is None else thresholds.get(APPLIED)
    if applied is not None and name in applied:  # thresholded by the norm's kernel
        x = applied[name]
    elif thresholds is not None and name in thresholds:
        if "relax_tau" in thresholds:  # learning: hard forward, sigmoid gradient
            x = rules.relaxed_sparsify(x, thresholds[name], thresholds["relax_tau"])
        else:
            x = rules.sparsify(x, thresholds[name])
    if thresholds is not None and name in thresholds.get("masks", {}):  # Deja Vu
        x = jnp.where(thresholds["masks"][name], x, jnp.zeros((), x.dtype))
    module.sow("stats", name, rules.zero_fraction(x))
    if _sparsified(name, thresholds) if count is None else count:
        x = _count_zeros(module, name, x, fused)
    return x


def _read_as(module: nn.Module, name: str, x: jax.Array, x_read, sparsified: bool) -> None:
    """Records point `name` (input `x`) as `_sparse` does, where its projection reads
    `x_read` (an array, or a function giving it, called only if its statistics are
    recorded): another point's thresholded input (k/v reading q's in a fused q/k/v
    matmul), or `x` thresholded inside the projection's kernel (o_proj). Its statistics
    are those of what is read; its zeros are counted if `sparsified`. Thresholding `x`
    in XLA instead would give the same values, but costs a kernel per layer: as a second
    consumer of `x` it keeps XLA from fusing q's threshold into the RMSNorm that makes
    `x`, and before o_proj it is a kernel of its own (benchmarks/NOTES_kernels.md)."""
    module.sow("taps", name, x)
    if module.is_mutable_collection("stats") or module.is_mutable_collection("zeros"):
        kept = x_read() if callable(x_read) else x_read
        module.sow("stats", name, rules.zero_fraction(kept))
        if sparsified:  # an array already counted (q's input) or made only to be counted
            module.sow("zeros", name, kept == 0)


def _kernel_threshold(kn: Kernels, name: str, x: jax.Array, thresholds: dict | None):
    """The plain threshold of point `name` where its projection runs through the
    sparse-input kernel (a pallas decode step), which then applies it: no XLA kernel of
    its own between the attention's PV product and o_proj. None where `_sparse` applies
    it (no kernel, a relaxed threshold while learning, or a Deja Vu mask on top)."""
    if not kn.use(name, x):
        return None
    return _plain_threshold(name, x.shape[-1], thresholds)  # what the kernel takes


def _plain_threshold(name: str, width: int, thresholds: dict | None):
    """Point `name`'s threshold where it is a plain one (no relaxation while learning, no
    Deja Vu mask on top) that a kernel can apply to its `width` channels; else None."""
    if thresholds is None or name not in thresholds:
        return None
    if "relax_tau" in thresholds or name in thresholds.get("masks", {}):
        return None
    t = thresholds[name]
    return t if jnp.shape(t) in ((), (width,)) else None


def _decode_heads(kn: Kernels, thresholds: dict | None, c: ModelConfig, t: int):
    """The Deja Vu head keep-mask [B, H] of a pallas decode step with `Kernels.q_rows`, read
    off the head-expanded `o_in` mask (`llama.with_predicted_masks`); else None."""
    masks = {} if thresholds is None else thresholds.get("masks", {})
    if not (kn.q_rows and t == 1 and "o_in" in masks):
        return None
    o_keep = masks["o_in"]  # [B, 1, H * Dh], constant over each head's Dh channels
    return o_keep.reshape(o_keep.shape[0], c.num_heads, c.head_dim)[:, :, 0]


def _stacked_q_kv_input(module, kn: Kernels, h, thresholds: dict | None, t: int):
    """chess+'s q and k/v inputs as the two "tokens" of one [B, 2, d] input, in an XLA
    decode step (one token per row, neither projection through a kernel) where q and
    k/v have thresholds of their own; else None. q_proj and kv_proj then share their
    input, which XLA's GPU compiler merges into one GEMM over [q | kv] (weights read
    once), as it merges q/k/v for a shared input: one GEMM less per layer than two
    inputs, at batch 4 on an H200 (benchmarks/NOTES_kernels.md, "Batches 4 and 8").

    The stacked input is one select of the broadcast RMSNorm output against both rows'
    thresholds, which XLA can fuse into the norm; thresholding q's input and
    concatenating it with k/v's was two more kernels per layer (a select the norm could
    not take, its output having two consumers, and the concatenate). Statistics and zero
    counts are recorded as `_sparse` records them. The caller leaves out Deja Vu's
    head-sparse step (`_decode_heads`); a fused norm's thresholded inputs (`APPLIED`)
    are taken as they are instead."""
    if thresholds is None or t != 1 or not kn.fuse_kv or kn.fuse_qkv or APPLIED in thresholds:
        return None
    if kn.use("q_in", h) or kn.use("kv_in", h):
        return None
    masks = thresholds.get("masks", {})
    if "relax_tau" in thresholds or "q_in" in masks or "kv_in" in masks:
        return None
    rows = [thresholds.get("q_in"), thresholds.get("kv_in")]
    if all(r is None for r in rows):
        return None
    d = h.shape[-1]
    t_2xD = jnp.stack([jnp.broadcast_to(jnp.zeros(()) if r is None else r, (d,)) for r in rows])
    free_2x1 = jnp.asarray([[r is None] for r in rows])  # a row without a threshold keeps all
    h_Bx2xD = jnp.broadcast_to(h, (h.shape[0], 2, d))
    # `rules.sparsify`'s rule (t rounded to h's dtype), written as the one select that was
    # measured fusing into the norm on the GPU
    keep = (jnp.abs(h_Bx2xD) >= t_2xD.astype(h.dtype)) | free_2x1
    x_Bx2xD = jnp.where(keep, h_Bx2xD, jnp.zeros((), h.dtype))
    for i, name in enumerate(("q_in", "kv_in")):
        _read_as(module, name, h, x_Bx2xD[:, i : i + 1], _sparsified(name, thresholds))
    return x_Bx2xD


def _q_kv_one_launch(module, kn: Kernels, shared, xq, xkv, c: ModelConfig, dt, raw=False):
    """q_proj and kv_proj (each with its own input: chess+) in one kernel launch through
    the block's shared accumulator (`Kernels.q_kv_one_launch`), as `Linear` would compute
    them; None where that does not apply (no shared accumulator, initialization, either
    projection outside the kernels) or the products do not fit the buffer. `raw`: where
    they are instead, ((array, col) of q, (array, col) of k|v), float32: the accumulator
    itself, or (with biases) their outputs plus the biases."""
    if shared is None or not kn.q_kv_one_launch or module.is_initializing():
        return None
    if not (kn.use("q_in", xq) and kn.use("kv_in", xkv)):
        return None
    params = module.variables["params"]
    pq, pkv = params["q_proj"], params["kv_proj"]
    b = xq.shape[0]
    pairs = [
        (xq.reshape(b, -1).astype(dt), pq["kernel"]),
        (xkv.reshape(b, -1).astype(dt), pkv["kernel"]),
    ]
    col = shared.col
    ys = shared.matvecs(pairs, kn.impl)
    if ys is None:
        return None
    if raw and not c.qkv_bias:  # q first, then k|v, each from whole column blocks
        from pallas_kernels import accumulator_shape

        return (shared.buf, col), (shared.buf, col + accumulator_shape(b, c.q_dim)[1])
    if raw:
        return tuple(
            ((y + p["bias"].astype(jnp.float32)).reshape(b, -1), 0) for y, p in zip(ys, (pq, pkv))
        )
    out = []
    for y, p in zip(ys, (pq, pkv)):
        if c.qkv_bias:
            y = y + p["bias"].astype(jnp.float32)
        out.append(y.astype(dt).reshape(b, 1, -1))
    return tuple(out)


def _q_kv_sources(module, kn: Kernels, shared, q_proj, kv_proj, x_Bx2xD, xq, xkv, c):
    """((array, col) of q, (array, col) of k|v): where a decode step's q_proj and kv_proj
    (each with its own input: chess+) leave their float32 outputs, for the packed
    attention kernel: in the block's accumulator (no bias to add), or their own outputs.
    Runs the projections as `SelfAttention` does otherwise (one stacked GEMM in an XLA
    step, one launch through the accumulator in a pallas step where it applies)."""
    if x_Bx2xD is not None:  # one GEMM each over [q | kv]: row 0 read by q, row 1 by k|v
        b = x_Bx2xD.shape[0]
        q = q_proj(x_Bx2xD, accumulator=True).reshape(b, -1)
        kv = kv_proj(x_Bx2xD, accumulator=True).reshape(b, -1)
        return (q, 0), (kv, 2 * c.kv_dim)
    b = xq.shape[0]
    col = None if shared is None else shared.col
    one = _q_kv_one_launch(module, kn, shared, xq, xkv, c, param_dtype(c), raw=True)
    if one is None:
        q = q_proj(xq, "q_in", shared=shared, accumulator=True).reshape(b, -1)
        q_end = None if shared is None else shared.col
        kv = kv_proj(xkv, "kv_in", shared=shared, accumulator=True).reshape(b, -1)
        if shared is not None and not c.qkv_bias and col != q_end != shared.col:
            return (shared.buf, col), (shared.buf, q_end)  # both in the accumulator
        return (q, 0), (kv, 0)
    return one


def raw_output(linear: Linear, x, point: str, shared, raw: bool, **kw):
    """`linear(x, point, shared=shared, **kw)`; with `raw`, as (float32 array [B', W],
    first column): the block's accumulator where the product went into it (and no bias is
    added after), else the float32 output [B, N] and 0."""
    if not raw:
        return linear(x, point, shared=shared, **kw)
    col = None if shared is None else shared.col
    y = linear(x, point, shared=shared, accumulator=True, **kw)
    if shared is not None and shared.col != col and not linear.use_bias:
        return shared.buf, col
    return y.reshape(y.shape[0], -1).astype(jnp.float32), 0


def _per_head_shard(
    fn,
    mesh,
    c: ModelConfig,
    q_BxHxD,
    heads_BxH,
    k_BxKxSxD,
    v_BxKxSxD,
    valid_BxS,
    kv_len,
    t_HxD,
    k_new_BxKxD=None,
    v_new_BxKxD=None,
    slot=None,
):
    """`fn(q, heads, k, v, valid, kv_len, threshold, k_new, v_new, slot)` (the attention
    kernel, which also writes the new token's k/v into the caches when given them and
    then returns (o, k, v)) run by each device of `mesh` on its own batch rows (`data`,
    where it divides the batch) and its own kv heads with their q heads and their rows
    of the `o_in` threshold `t_HxD` (`model`, where it divides the kv heads), as
    `jaxsparse.sharding` lays out the KV cache; the kernel on the whole arrays would make
    XLA gather the cache onto every device. Without a mesh (or neither axis usable): `fn`
    on the whole arrays."""
    from jax.sharding import PartitionSpec as P

    from jaxsparse.sharding import DATA, MODEL

    args = [q_BxHxD, heads_BxH, k_BxKxSxD, v_BxKxSxD, valid_BxS, kv_len, t_HxD]
    args += [k_new_BxKxD, v_new_BxKxD, slot]
    if mesh is None:
        return fn(*args)
    b = q_BxHxD.shape[0]
    bs = DATA if mesh.shape[DATA] > 1 and b % mesh.shape[DATA] == 0 else None
    ms = MODEL if mesh.shape[MODEL] > 1 and c.num_kv_heads % mesh.shape[MODEL] == 0 else None
    if bs is None and ms is None:
        return fn(*args)
    h = P(bs, ms)
    specs = [h, h, h, h, P(bs), P(), P(ms), h, h, P()]
    # kv_len, t_HxD and the new token's k/v and slot may be None
    given = [i for i, x in enumerate(args) if x is not None]

    def body(*xs):
        full = [None] * len(args)
        for i, x in zip(given, xs):
            full[i] = x
        return fn(*full)

    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=tuple(specs[i] for i in given),
        out_specs=h if slot is None else (h, h, h),
        check_vma=False,
    )(*(args[i] for i in given))


def _packed_attention_applies(kn: Kernels, c: ModelConfig, layer_cache, rope) -> bool:
    """Whether a decode step's attention kernel takes q, k and v straight from the
    projections (`Kernels.packed_attention`; `head_sparse_attention_from_qkv`: RoPE and
    the cache write inside): with a KV cache, the GPU kernel (or its interpreter), one
    device, no per-head q/k norms (Gemma 3) and, on a real GPU, half-heads of at least 16
    under RoPE (its dots' tiles)."""
    from pallas_kernels._dispatch import resolve_impl

    impl = resolve_impl(kn.impl, fn_name="Kernels")
    if not kn.packed_attention or layer_cache is None or c.is_gemma3:
        return False
    if impl not in ("gpu", "gpu_interpret") or not _one_device(kn.mesh):
        return False
    return impl == "gpu_interpret" or c.head_dim // (1 if rope is None else 2) >= 16


class SelfAttention(nn.Module):
    """`rope` is (cos, sin), or a dict of them by layer type (Gemma 3: one per RoPE base);
    `layer_type` picks this layer's tables and sliding window (`ModelConfig.layer_types`)."""

    config: ModelConfig
    kernels: Kernels = XLA
    layer_type: str = FULL

    @nn.compact
    def __call__(
        self,
        h_BxTxD,
        positions_BxT,
        kv_pos_BxS,
        rope,
        layer_cache,
        cache_index,
        thresholds,
        shared: SharedAccumulator | None = None,
        raw: bool = False,
    ):
        """`shared`: the block's `SharedAccumulator` (pallas decode on GPU), else None.
        `raw`: return o_proj's output as (float32 array [B', W], first column), where its
        kernel left it (`Kernels.fused_norms`), instead of [B, T, D] in the model's dtype."""
        c = self.config
        dt = param_dtype(c)
        b, t, _ = h_BxTxD.shape
        kn = self.kernels
        heads_BxH = _decode_heads(kn, thresholds, c, t)
        head_mask = None if thresholds is None else thresholds.get("masks", {}).get("o_in")
        if head_mask is not None:  # Deja Vu: an unselected head skips its rows of q_proj too
            self.sow("stats", "q_rows", rules.zero_fraction(head_mask))
        x_Bx2xD = xq = xkv = None
        if heads_BxH is None:  # chess+ in an XLA step: q and k/v read one stacked input
            x_Bx2xD = _stacked_q_kv_input(self, kn, h_BxTxD, thresholds, t)
        if x_Bx2xD is None:
            xq = _sparse(self, "q_in", h_BxTxD, thresholds)
            if kn.fuse_qkv:  # k/v read xq (Kernels.fuse_qkv: equal thresholds)
                _read_as(self, "kv_in", h_BxTxD, xq, _sparsified("kv_in", thresholds))
                xkv = xq
            else:
                xkv = _sparse(self, "kv_in", h_BxTxD, thresholds)
        # what the packed attention kernel's path needs of this step
        step = (positions_BxT, kv_pos_BxS, rope, layer_cache, cache_index, thresholds, shared, raw)
        attn_kernel = heads_BxH is not None or kn.attention_kernel(
            t, layer_cache is not None, c.head_dim
        )
        if kn.fuse_qkv and attn_kernel and _packed_attention_applies(kn, c, layer_cache, rope):
            # the kernel reads q|k|v as the projection left them and does the rest itself
            qkv_proj = Linear(
                c.q_dim + 2 * c.kv_dim, ("embed", "qkv_heads"), c.qkv_bias, dt, kn, name="qkv_proj"
            )
            # in place in the block's accumulator where it went there
            qkv = raw_output(qkv_proj, xq, "q_in", shared, True)
            return self._packed_attention(qkv, None, heads_BxH, step)
        if kn.fuse_qkv:  # q and k/v read the same input here (see Kernels.fuse_qkv)
            qkv = Linear(
                c.q_dim + 2 * c.kv_dim, ("embed", "qkv_heads"), c.qkv_bias, dt, kn, name="qkv_proj"
            )(xq, "q_in", shared=shared)
            # columns grouped per kv head: its G q heads, its k, its v (`prepare_params`)
            g = c.num_heads // c.num_kv_heads
            qkv = qkv.reshape(b, t, c.num_kv_heads, g + 2, c.head_dim)
            q = qkv[:, :, :, :g].reshape(b, t, c.q_dim)
            k = qkv[:, :, :, g].reshape(b, t, c.kv_dim)
            v = qkv[:, :, :, g + 1].reshape(b, t, c.kv_dim)
        elif kn.fuse_kv:
            q_proj = Linear(
                c.q_dim, ("embed", "q_heads"), c.qkv_bias, dt, kn, kn.q_rows, name="q_proj"
            )
            kv_proj = Linear(
                2 * c.kv_dim, ("embed", "kv_heads"), c.qkv_bias, dt, kn, name="kv_proj"
            )
            if (
                heads_BxH is None
                and attn_kernel
                and _packed_attention_applies(kn, c, layer_cache, rope)
            ):
                # the kernel reads q and k|v where the projections left them (float32)
                srcs = _q_kv_sources(self, kn, shared, q_proj, kv_proj, x_Bx2xD, xq, xkv, c)
                return self._packed_attention(*srcs, None, step)
            if x_Bx2xD is not None:  # one GEMM over [q | kv] (`_stacked_q_kv_input`)
                q = q_proj(x_Bx2xD)[:, :1]
                kv = kv_proj(x_Bx2xD)[:, 1:]
            elif heads_BxH is not None:  # only the selected heads' rows of q_proj are read
                q = q_proj(xq, gate=thresholds["masks"]["o_in"])
                kv = kv_proj(xkv, "kv_in", shared=shared)
            elif (one := _q_kv_one_launch(self, kn, shared, xq, xkv, c, dt)) is not None:
                q, kv = one
            else:
                q = q_proj(xq, "q_in", shared=shared)
                kv = kv_proj(xkv, "kv_in", shared=shared)
            kv = kv.reshape(b, t, c.num_kv_heads, 2, c.head_dim)  # k, v side by side per head
            k = kv[:, :, :, 0].reshape(b, t, c.kv_dim)
            v = kv[:, :, :, 1].reshape(b, t, c.kv_dim)
        else:
            q = Linear(c.q_dim, ("embed", "q_heads"), c.qkv_bias, dt, kn, name="q_proj")(
                xq, "q_in", shared=shared
            )
            k = Linear(c.kv_dim, ("embed", "kv_heads"), c.qkv_bias, dt, kn, name="k_proj")(
                xkv, "kv_in", shared=shared
            )
            v = Linear(c.kv_dim, ("embed", "kv_heads"), c.qkv_bias, dt, kn, name="v_proj")(
                xkv, "kv_in", shared=shared
            )
        q_BxTxHxD = q.reshape(b, t, c.num_heads, c.head_dim)
        k_BxTxKxD = k.reshape(b, t, c.num_kv_heads, c.head_dim)
        v_BxTxKxD = v.reshape(b, t, c.num_kv_heads, c.head_dim)
        if c.is_gemma3:  # q/k RMSNorm over head_dim, before RoPE
            q_BxTxHxD = RMSNorm(c.norm_eps, dt, True, name="q_norm")(q_BxTxHxD)
            k_BxTxKxD = RMSNorm(c.norm_eps, dt, True, name="k_norm")(k_BxTxKxD)
        if rope is not None:
            cos, sin = self._rope_tables(rope)
            q_BxTxHxD = apply_rope(q_BxTxHxD, cos, sin)
            k_BxTxKxD = apply_rope(k_BxTxKxD, cos, sin)
        k_BxKxTxD = k_BxTxKxD.transpose(0, 2, 1, 3)
        v_BxKxTxD = v_BxTxKxD.transpose(0, 2, 1, 3)
        mask, o_t, attn_heads_BxH, attn_t = self._attention_plan(
            heads_BxH, attn_kernel, positions_BxT, kv_pos_BxS, thresholds
        )
        # The attention kernel writes the new token's k/v into the cache itself (no
        # update kernels of their own); XLA's attention reads the updated cache.
        new_cache = None
        if layer_cache is not None and attn_heads_BxH is None:
            new_cache = update_layer_cache(layer_cache, k_BxKxTxD, v_BxKxTxD, cache_index)
            k_BxKxSxD, v_BxKxSxD = new_cache["k"], new_cache["v"]
        elif layer_cache is not None:
            k_BxKxSxD, v_BxKxSxD = layer_cache["k"], layer_cache["v"]
        else:
            k_BxKxSxD, v_BxKxSxD = k_BxKxTxD, v_BxKxTxD
        if attn_heads_BxH is not None:  # Deja Vu decode: attention for the selected heads only
            from pallas_kernels import head_sparse_attention
            from pallas_kernels.head_sparse_attention import threshold_per_head

            kv_len = None if layer_cache is None else jnp.asarray(cache_index + t, jnp.int32)

            def heads_attention(q, heads, k_, v_, valid, n, t_, k_new, v_new, slot):
                return head_sparse_attention(
                    q,
                    heads,
                    k_,
                    v_,
                    valid,
                    kv_len=n,
                    scale=c.attention_scale,
                    impl=kn.impl,
                    threshold=t_,
                    new_kv=None if k_new is None else (k_new, v_new, slot),
                    **kn.attention_options(k_.shape[2]),
                )

            writes = layer_cache is not None
            out = _per_head_shard(
                heads_attention,
                kn.mesh,
                c,
                q_BxTxHxD[:, 0],
                attn_heads_BxH,
                k_BxKxSxD,
                v_BxKxSxD,
                mask[:, 0],
                kv_len,
                None if attn_t is None else threshold_per_head(attn_t, c.num_heads, c.head_dim),
                k_BxKxTxD[:, :, 0] if writes else None,
                v_BxKxTxD[:, :, 0] if writes else None,
                jnp.asarray(cache_index, jnp.int32) if writes else None,
            )
            o_BxHxD = out[0] if writes else out
            if writes:
                new_cache = {"k": out[1], "v": out[2]}
            out_BxTxHD = o_BxHxD.reshape(b, t, c.q_dim).astype(q_BxTxHxD.dtype)
        else:
            out_BxTxHD = attend(q_BxTxHxD, k_BxKxSxD, v_BxKxSxD, mask, c.attention_scale)
        return self._output(out_BxTxHD, attn_t, o_t, thresholds, shared, raw), new_cache

    def _rope_tables(self, rope):
        """This layer's RoPE (cos, sin): `rope` itself, or its entry for the layer type."""
        return rope[self.layer_type] if isinstance(rope, dict) else rope

    def _attention_plan(self, heads_BxH, kernel: bool, positions_BxT, kv_pos_BxS, thresholds):
        """The attention mask [B, T, S]; o_proj's kernel threshold (`_kernel_threshold`);
        the heads the attention kernel runs (Deja Vu's `heads_BxH`, or every head where
        `kernel`; None: XLA's attention); and the `o_in` threshold that kernel applies to
        its output (where neither o_proj's kernel nor the taps take it)."""
        c, kn = self.config, self.kernels
        b, t = positions_BxT.shape
        mask = attention_mask(positions_BxT, kv_pos_BxS, c.attention_window(self.layer_type))
        shape = jax.ShapeDtypeStruct((b, t, c.q_dim), param_dtype(c))
        o_t = _kernel_threshold(kn, "o_in", shape, thresholds)
        attn_t = None
        if heads_BxH is None and kernel:
            heads_BxH = jnp.ones((b, c.num_heads), jnp.int32)  # every head: one kernel
            if o_t is None and not self.is_mutable_collection("taps"):
                attn_t = _plain_threshold("o_in", c.q_dim, thresholds)
        return mask, o_t, heads_BxH, attn_t

    def _output(self, out_BxTxHD, attn_t, o_t, thresholds, shared, raw=False):
        """o_proj of the heads' outputs, with the `o_in` point: applied by the attention
        kernel (`attn_t`), by o_proj's kernel (`o_t`), or here. `raw`: as (float32 array,
        first column) (`__call__`)."""
        c, kn = self.config, self.kernels
        b, t = out_BxTxHD.shape[:2]
        self.sow("taps", "head_out", out_BxTxHD.reshape(b, t, c.num_heads, c.head_dim))
        if attn_t is not None:  # the attention kernel applied it to its output
            _read_as(self, "o_in", out_BxTxHD, out_BxTxHD, sparsified=True)
        elif o_t is None:
            out_BxTxHD = _sparse(self, "o_in", out_BxTxHD, thresholds)
        else:  # o_proj's kernel applies it; recorded as the input it keeps
            kept = lambda: rules.sparsify(out_BxTxHD, o_t)
            _read_as(self, "o_in", out_BxTxHD, kept, sparsified=True)
        dt = param_dtype(c)
        o_proj = Linear(c.hidden_size, ("q_heads", "embed"), c.o_bias, dt, kn, name="o_proj")
        return raw_output(o_proj, out_BxTxHD, "o_in", shared, raw, threshold=o_t)

    def _packed_attention(self, qkv, kv, heads_BxH, step):
        """A decode step's attention by `head_sparse_attention_from_qkv`: q|k|v read from
        `qkv` = (array, first column) (the fused projection's float32 output, or the
        block's accumulator it was added into; with `kv` = (array, column), q there and
        k|v apart), RoPE, the cache write and the attention in one kernel launch
        (`_packed_attention_applies` says when). `step`: the call's positions, cache slot
        positions, RoPE tables, layer cache, cache index, thresholds and accumulators."""
        positions_BxT, kv_pos_BxS, rope, layer_cache, cache_index, thresholds, shared, raw = step
        from pallas_kernels import head_sparse_attention_from_qkv
        from pallas_kernels.head_sparse_attention import threshold_per_head

        c, kn = self.config, self.kernels
        b, t = positions_BxT.shape
        mask, o_t, heads_BxH, attn_t = self._attention_plan(
            heads_BxH, True, positions_BxT, kv_pos_BxS, thresholds
        )
        cs = None
        if rope is not None:
            cs = tuple(x[:, 0].astype(jnp.float32) for x in self._rope_tables(rope))
        o_BxHxD, k, v = head_sparse_attention_from_qkv(
            *qkv,
            heads_BxH,
            layer_cache["k"],
            layer_cache["v"],
            mask[:, 0],
            cache_index,
            num_heads=c.num_heads,
            dtype=param_dtype(c),
            kv=kv,
            rope=cs,
            kv_len=jnp.asarray(cache_index + t, jnp.int32),
            scale=c.attention_scale,
            impl=kn.impl,
            threshold=None
            if attn_t is None
            else threshold_per_head(attn_t, c.num_heads, c.head_dim),
            **kn.attention_options(layer_cache["k"].shape[2]),
        )
        out_BxTxHD = o_BxHxD.reshape(b, t, c.q_dim)
        out = self._output(out_BxTxHD, attn_t, o_t, thresholds, shared, raw)
        return out, {"k": k, "v": v}
