"""head_sparse_attention: every implementation against the reference on the model's
[B, Hkv, S, Dh] cache layout, GQA and MHA, partial slot blocks, invalid slots and kv_len."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import (
    head_mask_from_indices,
    head_sparse_attention,
    head_sparse_attention_reference,
)

# (B, H, Hkv, Dh, S): GQA with G=3 (SmolLM2's grouping), plain MHA (G=1); S is not a
# multiple of any slot block used below.
CONFIGS = [(2, 6, 2, 16, 300), (3, 4, 4, 32, 37)]


def blocks(impl, S):
    if impl.startswith("gpu"):
        return {"block_s": 32}
    return {"block_s": 128} if S > 128 else {}  # TPU: several slot blocks, the last partial


def make(kt, cfg, dtype, seed, p_sel):
    B, H, Hkv, Dh, S = cfg
    k = jax.random.split(jax.random.key(seed), 6)
    q = kt.normal(k[0], (B, H, Dh), dtype)
    kc = kt.normal(k[1], (B, Hkv, S, Dh), dtype)
    vc = kt.normal(k[2], (B, Hkv, S, Dh), dtype)
    hm = jax.random.uniform(k[3], (B, H)) < p_sel
    valid = jax.random.uniform(k[4], (B, S)) < 0.8  # holes: padding, windows
    kv_len = int(jax.random.randint(k[5], (), S // 2, S))  # the cache's unused tail
    valid = valid.at[:, 0].set(True)
    return q, hm, kc, vc, valid, kv_len


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("cfg", CONFIGS, ids=["gqa3", "mha"])
def test_matches_reference(kt, impl, dtype, cfg):
    B, H, _Hkv, Dh, S = cfg
    # heads kept with probability p_sel: head sparsity 0.5, 0, 1, 0.25 and 0.9
    for seed, p_sel in ((0, 0.5), (1, 1.0), (2, 0.0), (3, 0.75), (4, 0.1)):
        q, hm, kc, vc, valid, kv_len = make(kt, cfg, dtype, seed, p_sel)
        o = head_sparse_attention(q, hm, kc, vc, valid, kv_len=kv_len, impl=impl, **blocks(impl, S))
        want = head_sparse_attention_reference(q, hm, kc, vc, valid, kv_len=kv_len)
        what = f"{impl} seed={seed} p={p_sel}"
        assert o.shape == (B, H, Dh) and o.dtype == q.dtype
        o32 = np.asarray(o, np.float32)
        assert not np.any(o32[~np.asarray(hm)]), f"{what}: unselected heads must be 0"
        if p_sel > 0.0:
            kt.assert_close(o, want, dtype, what)


def test_reference_is_attention(kt):
    """The reference against a direct softmax attention of one selected head."""
    B, H, Hkv, Dh, S = 1, 4, 2, 8, 11
    q, _, kc, vc, valid, _ = make(kt, (B, H, Hkv, Dh, S), jnp.float32, 5, 1.0)
    hm = head_mask_from_indices(jnp.array([[3]]), H)
    o = head_sparse_attention_reference(q, hm, kc, vc, valid, kv_len=9)
    ok = np.asarray(valid[0]) & (np.arange(S) < 9)
    sc = np.asarray(kc[0, 1]) @ np.asarray(q[0, 3]) / np.sqrt(Dh)  # head 3 reads kv head 1
    p = np.exp(sc - sc[ok].max()) * ok
    want = (p / p.sum()) @ np.asarray(vc[0, 1])
    np.testing.assert_allclose(np.asarray(o[0, 3]), want, rtol=1e-5, atol=1e-6)
    assert not np.any(np.asarray(o[0, :3]))


def test_unread_cache_is_not_used(kt, impl):
    """Slots past kv_len and the kv heads no selected head reads are NaN, and so are the
    invalid slots below kv_len for the GPU kernel (it loads valid slots only; the TPU
    kernel copies whole slot blocks and gives invalid ones weight 0): the kernels must
    never let them into the output."""
    B, H, Hkv, Dh, S = 2, 6, 3, 16, 200
    q, _, kc, vc, valid, _ = make(kt, (B, H, Hkv, Dh, S), jnp.float32, 7, 1.0)
    hm = jnp.array([[1, 0, 0, 0, 1, 1], [0, 0, 1, 1, 0, 0]], bool)  # row 0 skips kv head 1
    kv_len = 150
    slot_ok = np.arange(S)[None] < kv_len
    if kt.is_gpu_impl(impl):
        slot_ok = slot_ok & np.asarray(valid)
    poison = (
        ~slot_ok[:, None, :, None]
        | (np.arange(Hkv) == 1)[None, :, None, None] & (np.arange(B) == 0)[:, None, None, None]
    )
    kp = jnp.where(poison, jnp.nan, kc)
    vp = jnp.where(poison, jnp.nan, vc)
    o = head_sparse_attention(q, hm, kp, vp, valid, kv_len=kv_len, impl=impl, **blocks(impl, S))
    want = head_sparse_attention_reference(q, hm, kc, vc, valid, kv_len=kv_len)
    kt.assert_close(o, want, jnp.float32, f"{impl} poisoned cache")


def test_bad_inputs():
    q = jnp.ones((2, 4, 8))
    hm = jnp.ones((2, 4), bool)
    kc = jnp.ones((2, 2, 10, 8))
    valid = jnp.ones((2, 10), bool)
    with pytest.raises(ValueError, match="impl='xla'.*allowed values"):
        head_sparse_attention(q, hm, kc, kc, valid, impl="xla")
    with pytest.raises(ValueError, match="not a multiple of Hkv=3"):
        head_sparse_attention(
            q, hm, jnp.ones((2, 3, 10, 8)), jnp.ones((2, 3, 10, 8)), valid, impl="reference"
        )
    with pytest.raises(ValueError, match=r"shape mismatch: kv_valid_BxS.shape"):
        head_sparse_attention(q, hm, kc, kc, valid[:, :9], impl="gpu_interpret")
    with pytest.raises(ValueError, match=r"shape mismatch: k_cache.shape\[3\] \(Dh\)"):
        head_sparse_attention(q, hm, kc[..., :4], kc[..., :4], valid, impl="tpu_interpret")
    with pytest.raises(ValueError, match="kv_len must be a scalar"):
        head_sparse_attention(q, hm, kc, kc, valid, kv_len=jnp.ones(2, jnp.int32), impl="reference")
    with pytest.raises(ValueError, match="block_s=100 must be a multiple of 128"):
        head_sparse_attention(
            q,
            hm,
            jnp.ones((2, 2, 300, 8)),
            jnp.ones((2, 2, 300, 8)),
            jnp.ones((2, 300), bool),
            impl="tpu_interpret",
            block_s=100,
        )
    with pytest.raises(ValueError, match="power of 2"):
        head_sparse_attention(q, hm, kc, kc, valid, impl="gpu_interpret", block_s=24)
    # the compiled GPU kernel's tensor-core dots need 16-wide tiles (interpret mode has
    # no such limit, so the small shapes above run there)
    with pytest.raises(
        ValueError, match=r"Dh >= 16 \(32 with RoPE inside\) and block_s >= 16, got Dh=8"
    ):
        jax.eval_shape(lambda *a: head_sparse_attention(*a, impl="gpu"), q, hm, kc, kc, valid)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_threshold_zeroes_small_outputs(kt, impl, dtype):
    """`threshold=` zeroes the output entries below it, compared in o's dtype (the float32
    threshold rounded to it, as `jaxsparse.rules.sparsify` compares): exactly the
    unthresholded output of the same implementation, thresholded afterwards. Per channel
    ([H * Dh], merged heads' order, and [H, Dh]) and scalar."""
    B, H, Hkv, Dh, S = 2, 6, 2, 16, 300
    q, hm, kc, vc, valid, kv_len = make(kt, (B, H, Hkv, Dh, S), dtype, 11, 0.75)
    kw = dict(kv_len=kv_len, impl=impl, **blocks(impl, S))
    o = head_sparse_attention(q, hm, kc, vc, valid, **kw)
    o32 = np.abs(np.asarray(o, np.float32))
    rng = np.random.default_rng(0)
    per_channel = np.quantile(o32[o32 > 0], rng.uniform(0.2, 0.8, H * Dh)).astype(np.float32)
    for t in (per_channel, per_channel.reshape(H, Dh), np.float32(np.median(o32[o32 > 0]))):
        got = head_sparse_attention(q, hm, kc, vc, valid, threshold=jnp.asarray(t), **kw)
        t_HxDh = jnp.broadcast_to(jnp.asarray(t).reshape(-1), (H * Dh,)).reshape(H, Dh)
        want = jnp.where(jnp.abs(o) >= t_HxDh.astype(dtype)[None], o, jnp.zeros((), dtype))
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
        zeroed = np.mean(np.asarray(got) == 0)
        assert 0.3 < zeroed < 0.9, f"{impl}: {zeroed:.2f} zeroed; the threshold did nothing?"
    with pytest.raises(ValueError, match=r"threshold has shape \(5,\)"):
        head_sparse_attention(q, hm, kc, vc, valid, threshold=jnp.ones(5), **kw)


@pytest.mark.parametrize("num_splits", [2, 3, 16])
def test_gpu_slot_splits_match_reference(kt, num_splits):
    """The GPU kernel with the slots split over `num_splits` programs per (row, kv head)
    and merged afterwards: the reference's output, with ranges that are partial, past
    kv_len (empty: 16 splits of 10 chunks), or hold only invalid slots; with the
    threshold, exactly its own unthresholded output thresholded afterwards."""
    impl = "gpu_interpret"
    for dtype in (jnp.float32, jnp.bfloat16):
        for cfg in CONFIGS:
            for seed, p_sel in ((0, 0.5), (1, 1.0)):
                q, hm, kc, vc, valid, kv_len = make(kt, cfg, dtype, seed, p_sel)
                kw = {"kv_len": kv_len, "impl": impl, "block_s": 32, "num_splits": num_splits}
                o = head_sparse_attention(q, hm, kc, vc, valid, **kw)
                want = head_sparse_attention_reference(q, hm, kc, vc, valid, kv_len=kv_len)
                kt.assert_close(o, want, dtype, f"splits={num_splits} {cfg} seed={seed}")
                assert not np.any(np.asarray(o, np.float32)[~np.asarray(hm)])
    # slots past kv_len never read: NaN there changes nothing
    q, hm, kc, vc, valid, _ = make(kt, CONFIGS[0], jnp.float32, 3, 1.0)
    past = (jnp.arange(kc.shape[2]) >= 100)[None, None, :, None]
    kp, vp = jnp.where(past, jnp.nan, kc), jnp.where(past, jnp.nan, vc)
    kw = {"kv_len": 100, "impl": impl, "block_s": 32, "num_splits": num_splits}
    o = head_sparse_attention(q, hm, kp, vp, valid, **kw)
    kt.assert_close(
        o,
        head_sparse_attention_reference(q, hm, kc, vc, valid, kv_len=100),
        jnp.float32,
        "nan tail",
    )
    t = jnp.float32(np.median(np.abs(np.asarray(o))[np.asarray(o) != 0]))
    got = head_sparse_attention(q, hm, kp, vp, valid, threshold=t, **kw)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.where(jnp.abs(o) >= t, o, 0.0)))


@pytest.mark.parametrize("num_splits", [1, 3])
def test_new_kv_written_into_the_cache_and_attended(kt, impl, num_splits):
    """`new_kv=(k_new, v_new, slot)`: the caches come back with the new token at `slot`
    and every other slot unchanged (bitwise), and o is the reference's over those
    caches. Slots at a chunk's start and end, the first and last slot, and a slot past S
    (clamped to S - 1 as dynamic_update_slice clamps); a kv head no selected query head
    reads (row 0, kv head 1) gets its row written too. The caches passed in hold NaN at
    the slot: it must be read from k_new/v_new, not from the cache."""
    if not kt.is_gpu_impl(impl) and num_splits > 1:
        pytest.skip("slot ranges are a GPU kernel option")
    B, H, Hkv, Dh, S = 2, 6, 3, 16, 200
    hm = jnp.array([[1, 0, 0, 0, 1, 1], [0, 0, 1, 1, 0, 0]], bool)
    opts = {"num_splits": num_splits} if kt.is_gpu_impl(impl) else {}
    for dtype in (jnp.float32, jnp.bfloat16):
        q, _, kc, vc, valid, _ = make(kt, (B, H, Hkv, Dh, S), dtype, 21, 1.0)
        kn = kt.normal(jax.random.key(22), (B, Hkv, Dh), jnp.float32)  # cast to the cache's
        vn = kt.normal(jax.random.key(23), (B, Hkv, Dh), jnp.float32)
        valid = valid.at[:, :].set(True)
        for slot in (0, 31, 32, 127, 199, 250):
            at = min(slot, S - 1)
            kp = kc.at[:, :, at].set(jnp.nan)
            vp = vc.at[:, :, at].set(jnp.nan)
            o, k2, v2 = head_sparse_attention(
                q,
                hm,
                kp,
                vp,
                valid,
                kv_len=at + 1,
                impl=impl,
                new_kv=(kn, vn, slot),
                **blocks(impl, S),
                **opts,
            )
            # the TPU interpreter's callbacks run jax ops: let them finish before the
            # eager ops below (on 2 cores the two can deadlock in XLA's CPU thread pool)
            jax.block_until_ready((o, k2, v2))
            want_k = kc.at[:, :, at].set(kn.astype(dtype))
            want_v = vc.at[:, :, at].set(vn.astype(dtype))
            what = f"{impl} {jnp.dtype(dtype).name} slot={slot} splits={num_splits}"
            np.testing.assert_array_equal(np.asarray(k2), np.asarray(want_k), what)
            np.testing.assert_array_equal(np.asarray(v2), np.asarray(want_v), what)
            want = head_sparse_attention_reference(q, hm, want_k, want_v, valid, kv_len=at + 1)
            kt.assert_close(o, want, dtype, what)


def test_new_kv_bad_inputs():
    q = jnp.ones((2, 4, 8))
    hm = jnp.ones((2, 4), bool)
    kc = jnp.ones((2, 2, 10, 8))
    valid = jnp.ones((2, 10), bool)
    kn = jnp.ones((2, 2, 8))
    with pytest.raises(ValueError, match=r"new_kv must be \(k_new"):
        head_sparse_attention(q, hm, kc, kc, valid, impl="reference", new_kv=(kn, kn))
    with pytest.raises(ValueError, match=r"new_kv k_new.shape is \(2, 1, 8\), expected"):
        head_sparse_attention(q, hm, kc, kc, valid, impl="gpu_interpret", new_kv=(kn[:, :1], kn, 0))
    with pytest.raises(ValueError, match="new_kv's slot must be a scalar"):
        head_sparse_attention(q, hm, kc, kc, valid, impl="reference", new_kv=(kn, kn, jnp.ones(2)))


@pytest.mark.parametrize("num_splits", [1, 3])
def test_from_qkv_matches_slicing_rope_and_cache_write(kt, impl, num_splits):
    """`head_sparse_attention_from_qkv`: q, k and v read from columns `col` on of a wider
    float32 array (rows past B ignored), rounded to the model's dtype, RoPE applied to q
    and k (`rope_rotate_half`), k and v written at `slot`: the caches equal those the
    model's own steps make (slice, round, rotate, dynamic_update_slice; bitwise but for
    the rotated k), and o the reference's over them. With and without RoPE; GQA (G=3) and
    MHA; the fused q|k|v layout and q apart from k|v (`kv=`)."""
    from pallas_kernels import head_sparse_attention_from_qkv
    from pallas_kernels.head_sparse_attention import rope_rotate_half

    if not kt.is_gpu_impl(impl) and num_splits > 1:
        pytest.skip("slot ranges are a GPU kernel option")
    opts = {"num_splits": num_splits} if kt.is_gpu_impl(impl) else {}
    for (B, H, Hkv, Dh, S), dtype in itertools.product(CONFIGS, (jnp.float32, jnp.bfloat16)):
        G, col = H // Hkv, 24
        width = (H + 2 * Hkv) * Dh
        ks = jax.random.split(jax.random.key(31), 4)
        src = kt.normal(ks[0], (B + 1, col + width + 32), jnp.float32)
        _, hm, kc, vc, valid, _ = make(kt, (B, H, Hkv, Dh, S), dtype, 32, 0.75)
        ang = jax.random.uniform(ks[1], (B, Dh // 2)) * 6.0
        ang = jnp.concatenate([ang, ang], axis=-1)
        cases = itertools.product((((jnp.cos(ang), jnp.sin(ang)), S // 3), (None, 0)), (0, 1))
        for (rope, slot), split in cases:
            if impl == "gpu" and rope is not None and Dh < 32:
                continue  # the compiled kernel refuses it: its RoPE halves are tensor-core dims
            what = f"{impl} {(B, H, Hkv, Dh, S)} {jnp.dtype(dtype).name} rope={rope is not None}"
            # fused q|k|v from `col`; or q from `col` and k|v from `kv_col` (chess+'s layout)
            kv_col = col + H * Dh + 16
            kv = (src, kv_col) if split else None
            o, k2, v2 = head_sparse_attention_from_qkv(
                src,
                col,
                hm,
                kc,
                vc,
                valid,
                slot,
                num_heads=H,
                dtype=dtype,
                kv=kv,
                rope=rope,
                kv_len=slot + 1,
                impl=impl,
                **blocks(impl, S),
                **opts,
            )
            jax.block_until_ready((o, k2, v2))  # see test_new_kv_written_into_the_cache...
            if split:
                q = src[:B, col : col + H * Dh].astype(dtype).reshape(B, H, Dh)
                kvb = src[:B, kv_col : kv_col + 2 * Hkv * Dh].astype(dtype)
                k, v = kvb.reshape(B, Hkv, 2, Dh)[:, :, 0], kvb.reshape(B, Hkv, 2, Dh)[:, :, 1]
            else:
                blk = src[:B, col : col + width].astype(dtype).reshape(B, Hkv, G + 2, Dh)
                q, k, v = blk[:, :, :G].reshape(B, H, Dh), blk[:, :, G], blk[:, :, G + 1]
            if rope is not None:
                q = rope_rotate_half(q, rope[0][:, None], rope[1][:, None])
                k = rope_rotate_half(k, rope[0][:, None], rope[1][:, None])
            want_k, want_v = kc.at[:, :, slot].set(k), vc.at[:, :, slot].set(v)
            others = np.arange(S) != slot  # untouched, bitwise
            np.testing.assert_array_equal(
                np.asarray(k2)[:, :, others], np.asarray(kc)[:, :, others]
            )
            np.testing.assert_array_equal(np.asarray(v2), np.asarray(want_v), what)
            # the rotated k: the same float32 steps, which a compiler may contract (FMA)
            # differently: equal within the dtype's rounding
            kt.assert_close(k2[:, :, slot], k, dtype, what)
            want = head_sparse_attention_reference(q, hm, want_k, want_v, valid, kv_len=slot + 1)
            assert o.dtype == jnp.dtype(dtype)
            kt.assert_close(o, want, dtype, what)


def test_from_qkv_bad_inputs():
    from pallas_kernels import head_sparse_attention_from_qkv

    hm = jnp.ones((2, 4), bool)
    kc = jnp.ones((2, 2, 10, 8))
    valid = jnp.ones((2, 10), bool)
    src = jnp.ones((2, 64))
    kw = {"num_heads": 4, "dtype": jnp.float32, "impl": "gpu_interpret"}
    with pytest.raises(ValueError, match="qkv_col=20: q\\|k\\|v takes 64 columns"):
        head_sparse_attention_from_qkv(src, 20, hm, kc, kc, valid, 0, **kw)
    with pytest.raises(ValueError, match="num_heads=3 must be a positive multiple of Hkv=2"):
        head_sparse_attention_from_qkv(src, 0, hm, kc, kc, valid, 0, **{**kw, "num_heads": 3})
    with pytest.raises(ValueError, match=r"rope cos.shape is \(2, 4\), expected \(2, 8\)"):
        rope = (jnp.ones((2, 4)), jnp.ones((2, 4)))
        head_sparse_attention_from_qkv(src, 0, hm, kc, kc, valid, 0, rope=rope, **kw)
    with pytest.raises(ValueError, match="fewer than B=2"):
        head_sparse_attention_from_qkv(src[:1], 0, hm, kc, kc, valid, 0, **kw)
