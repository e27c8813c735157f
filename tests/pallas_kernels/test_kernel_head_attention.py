"""head_sparse_attention: every implementation against the reference, GQA included."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import (
    head_mask_from_indices,
    head_sparse_attention,
    head_sparse_attention_reference,
)

# (B, d, H, Hkv, Dh, S): GQA with G=4, plain MHA (G=1), odd d and S
CONFIGS = [(1, 96, 8, 2, 16, 40), (3, 72, 4, 4, 32, 37)]


def make(kt, cfg, dtype, seed):
    B, d, H, Hkv, Dh, S = cfg
    k = jax.random.split(jax.random.key(seed), 8)
    x = kt.normal(k[0], (B, d), dtype)
    wq = kt.normal(k[1], (H * Dh, d), dtype, d**-0.5)
    wk = kt.normal(k[2], (Hkv * Dh, d), dtype, d**-0.5)
    wv = kt.normal(k[3], (Hkv * Dh, d), dtype, d**-0.5)
    wo = kt.normal(k[4], (H * Dh, d), dtype, (H * Dh) ** -0.5)
    kc = kt.normal(k[5], (B, S, Hkv, Dh), dtype)
    vc = kt.normal(k[6], (B, S, Hkv, Dh), dtype)
    lengths = jax.random.randint(k[7], (B,), 0, S).at[0].set(0 if seed % 2 else S - 1)
    inv = 1.0 / (10000.0 ** (jnp.arange(0, Dh, 2) / Dh))
    ang = lengths.astype(jnp.float32)[:, None] * inv[None, :]
    ang = jnp.concatenate([ang, ang], axis=-1)
    return x, wq, wk, wv, wo, kc, vc, lengths, jnp.cos(ang), jnp.sin(ang)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("cfg", CONFIGS, ids=["gqa4", "mha"])
def test_matches_reference(kt, impl, dtype, cfg):
    B, H = cfg[0], cfg[2]
    for seed, p_sel in ((0, 0.5), (1, 1.0), (2, 0.0), (3, 0.25)):
        x, wq, wk, wv, wo, kc, vc, ln, cos, sin = make(kt, cfg, dtype, seed)
        hm = (jax.random.uniform(jax.random.key(50 + seed), (B, H)) < p_sel).astype(jnp.int32)
        args = (x, hm, wq, wk, wv, wo, kc, vc, ln, cos, sin)
        y, k2, v2 = head_sparse_attention(
            *args, impl=impl, **({"block_s": 16} if impl.startswith("gpu") else {})
        )
        yr, kr, vr = head_sparse_attention_reference(*args)
        what = f"{impl} seed={seed} p={p_sel}"
        if p_sel == 0.0:
            assert not np.any(np.asarray(y, np.float32)), what
        else:
            kt.assert_close(y, yr, dtype, what)
        # K/V are written for every kv head, selected or not (the module's KV choice)
        np.testing.assert_array_equal(np.asarray(k2, np.float32), np.asarray(kr, np.float32))
        np.testing.assert_array_equal(np.asarray(v2, np.float32), np.asarray(vr, np.float32))
        b = np.arange(B)
        assert not np.allclose(np.asarray(kr[b, ln], np.float32), np.asarray(kc[b, ln], np.float32))


def test_reference_is_attention(kt):
    """The reference against a per-head loop written from the definition."""
    cfg = CONFIGS[0]
    _B, d, H, Hkv, Dh, _S = cfg
    x, wq, wk, wv, wo, kc, vc, ln, cos, sin = make(kt, cfg, jnp.float32, 4)
    hm = head_mask_from_indices(jnp.array([[1, 6]]), H)
    y, kn, vn = head_sparse_attention_reference(x, hm, wq, wk, wv, wo, kc, vc, ln, cos, sin)
    X = np.asarray(x, np.float64)[0]
    L = int(ln[0])

    def rope(t, c, s):
        half = Dh // 2
        return t * c + np.concatenate([-t[half:], t[:half]]) * s

    c, s = np.asarray(cos[0], np.float64), np.asarray(sin[0], np.float64)
    want = np.zeros(d)
    for h in (1, 6):
        q = rope(np.asarray(wq, np.float64)[h * Dh : (h + 1) * Dh] @ X, c, s)
        kvh = h // (H // Hkv)
        K = np.asarray(kn, np.float64)[0, : L + 1, kvh]
        V = np.asarray(vn, np.float64)[0, : L + 1, kvh]
        sc = K @ q / math.sqrt(Dh)
        p = np.exp(sc - sc.max())
        o = (p / p.sum()) @ V
        want += o @ np.asarray(wo, np.float64)[h * Dh : (h + 1) * Dh]
    assert kt.rel_err(y[0], want) < 1e-5


def test_unselected_heads_are_not_read(kt, gpu_impl):
    """q/o weights of unselected heads poisoned with NaN: the GPU path never reads them."""
    cfg = CONFIGS[0]
    _B, _d, H, _Hkv, Dh, _S = cfg
    x, wq, wk, wv, wo, kc, vc, ln, cos, sin = make(kt, cfg, jnp.float32, 5)
    hm = head_mask_from_indices(jnp.array([[0, 5]]), H)
    dead = jnp.repeat(hm[0] == 0, Dh)[:, None]
    args = (
        x,
        hm,
        jnp.where(dead, jnp.nan, wq),
        wk,
        wv,
        jnp.where(dead, jnp.nan, wo),
        kc,
        vc,
        ln,
        cos,
        sin,
    )
    y, _, _ = head_sparse_attention(*args, impl=gpu_impl, block_s=16)
    yr, _, _ = head_sparse_attention_reference(x, hm, wq, wk, wv, wo, kc, vc, ln, cos, sin)
    kt.assert_close(y, yr, jnp.float32, "poisoned unselected heads")


def test_bad_inputs(kt):
    cfg = CONFIGS[0]
    B, _d, H, _Hkv, _Dh, _S = cfg
    x, wq, wk, wv, wo, kc, vc, ln, cos, sin = make(kt, cfg, jnp.float32, 0)
    hm = jnp.ones((B, H), jnp.int32)
    good = (x, hm, wq, wk, wv, wo, kc, vc, ln, cos, sin)
    with pytest.raises(ValueError, match="impl='xla'.*allowed values"):
        head_sparse_attention(*good, impl="xla")
    bad_heads = (x, jnp.ones((B, H - 1)), *good[2:])
    with pytest.raises(ValueError, match="not a multiple of Hkv"):
        head_sparse_attention(*bad_heads, impl="reference")
    with pytest.raises(ValueError, match="cos_BxDh.shape"):
        head_sparse_attention(*good[:9], cos[:, :-2], sin, impl="gpu_interpret")
    with pytest.raises(ValueError, match="wo_HDhxd.shape"):
        head_sparse_attention(*good[:5], wo.T, *good[6:], impl="tpu_interpret")
