"""gated_matvec: every implementation against the reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import gated_matvec, gated_matvec_reference
from pallas_kernels.gated_matvec import ACTIVATIONS, gate_values

M, D = 300, 200  # not multiples of the blocks below
SPARSITIES = (0.0, 0.5, 0.9, 1.0)


def blocks(impl):
    return {"block_m": 64, "block_d": 64} if impl.startswith("gpu") else {"block_m": 32}


def data(kt, seed, B, s, dtype):
    k = jax.random.split(jax.random.key(seed), 4)
    x = kt.normal(k[0], (B, D), dtype)
    g = kt.sparse_values(k[1], (B, M), s, dtype)
    wu = kt.normal(k[2], (M, D), dtype, scale=D**-0.5)
    wd = kt.normal(k[3], (M, D), dtype, scale=M**-0.5)
    return x, g, wu, wd


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("B", [1, 5])
def test_gated_matches_reference(kt, impl, dtype, B):
    for seed in (0, 1):
        for s in SPARSITIES:
            x, g, wu, _ = data(kt, seed * 7 + int(10 * s), B, s, dtype)
            h = gated_matvec(x, g, wu, impl=impl, **blocks(impl))
            assert h.dtype == x.dtype
            kt.assert_close(h, gated_matvec_reference(x, g, wu), dtype, f"{impl} s={s}")
            # rows with g == 0 are exact zeros
            assert not np.any(np.asarray(h, np.float32)[np.asarray(g == 0)])


def rule_data(kt, seed, B, s, dtype, activation, per_row=True):
    """x, the gate's float32 pre-activation, Wu, and thresholds that zero about a
    fraction s of act(pre): the s-quantile of |act(pre)|, scaled per row (0: none, 1: inf)."""
    k = jax.random.split(jax.random.key(seed), 4)
    x = kt.normal(k[0], (B, D), dtype)
    pre = kt.normal(k[1], (B, M), jnp.float32, scale=2.0)
    wu = kt.normal(k[2], (M, D), dtype, scale=D**-0.5)
    g = gate_values(pre, activation, None, dtype)
    q = {0.0: 0.0, 1.0: np.inf}.get(s) or float(jnp.quantile(jnp.abs(g), s))
    scale = jax.random.uniform(k[3], (M,), minval=0.5, maxval=1.5) if per_row else 1.0
    t = jnp.asarray(q * scale, jnp.float32) if q not in (0.0, np.inf) else jnp.float32(q)
    return x, pre, wu, jnp.broadcast_to(t, (M,)) if per_row else t


@pytest.mark.parametrize("activation", [None, *sorted(ACTIVATIONS)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("B", [1, 5])
def test_gate_rule_in_kernel(kt, impl, activation, dtype, B):
    """With `activation`/`threshold` the kernel makes g from the pre-activation
    (`gate_values`: CHESS's per-row threshold, CATS's one threshold), exact zeros where
    g is below its threshold, and equals the reference on the g that rule gives. (The
    TPU path makes g in XLA before its kernel: one case of each there.)"""
    if not kt.is_gpu_impl(impl) and (B, dtype) != (5, jnp.bfloat16):
        pytest.skip("the TPU path's g is made by XLA: the B=5 bf16 cases cover it")
    for i, s in enumerate(SPARSITIES):
        for per_row in (True, False) if i % 2 else (True,):
            x, pre, wu, t = rule_data(kt, int(10 * s) + B, B, s, dtype, activation, per_row)
            h = gated_matvec(
                x, pre, wu, activation=activation, threshold=t, impl=impl, **blocks(impl)
            )
            g = gate_values(pre, activation, t, dtype)
            what = f"{impl} {activation} s={s} per_row={per_row}"
            assert h.dtype == x.dtype
            kt.assert_close(h, gated_matvec_reference(x, g, wu), dtype, what)
            # the rule's zeros are exact: entries act(pre) has and the threshold drops.
            # Not act's own zeros: GELU's tanh rounds to -1 (so g = 0) from |z| ~ 7.9-8.0
            # in XLA and only later in the GPU kernel's libdevice tanhf (g ~ -1e-7 there).
            ruled = (gate_values(pre, activation, None, dtype) != 0) & (g == 0)
            assert not np.any(np.asarray(h, np.float32)[np.asarray(ruled)]), what
            frac = float(jnp.mean(g == 0))
            assert abs(frac - s) < 0.25, f"{what}: {frac:.2f} of g zeroed"


def test_gate_values_is_the_models_rule():
    """`gate_values` is the model's XLA rule bit for bit: act in float32 from pre rounded
    to the params' dtype, rounded back, then `rules.sparsify` (jaxsparse.models.llama)."""
    from jaxsparse import rules

    pre = jax.random.normal(jax.random.key(0), (3, M), jnp.float32) * 3
    t = jax.random.uniform(jax.random.key(1), (M,), maxval=0.8)
    for name, act in ACTIVATIONS.items():
        for dt in (jnp.float32, jnp.bfloat16):
            model = rules.sparsify(act(pre.astype(dt).astype(jnp.float32)).astype(dt), t)
            ours = gate_values(pre, name, t, dt)
            np.testing.assert_array_equal(np.asarray(ours), np.asarray(model, np.float32))


def test_inactive_rows_are_not_read(kt, impl):
    """Rows of Wu whose gate is zero for every batch row (a random pattern) are NaN:
    never read (GPU: masked rows; TPU: only active rows are copied, one DMA each)."""
    B = 2
    x, g, wu, _ = data(kt, 11, B, 0.0, jnp.float32)
    dead = jax.random.uniform(jax.random.key(12), (M,)) < 0.6
    g = jnp.where(dead[None, :], 0.0, g)
    nan_rows = lambda w: jnp.where(dead[:, None], jnp.nan, w)
    h = gated_matvec(x, g, nan_rows(wu), impl=impl, **blocks(impl))
    kt.assert_close(h, gated_matvec_reference(x, g, wu), jnp.float32, "gated")
    # the same rows zeroed by the threshold inside the kernel
    t = jnp.where(dead, jnp.inf, 0.0)
    h = gated_matvec(x, g, nan_rows(wu), activation="silu", threshold=t, impl=impl, **blocks(impl))
    want = gated_matvec_reference(x, g, wu, activation="silu", threshold=t)
    kt.assert_close(h, want, jnp.float32, "gated, threshold in the kernel")


def test_bad_inputs():
    x = jnp.ones((2, D))
    g = jnp.ones((2, M))
    wu = jnp.ones((M, D))
    with pytest.raises(ValueError, match="impl='triton'.*allowed values"):
        gated_matvec(x, g, wu, impl="triton")
    with pytest.raises(ValueError, match=r"shape mismatch: wu_mxd.shape\[1\]"):
        gated_matvec(x, g, jnp.ones((M, D + 1)), impl="reference")
    with pytest.raises(ValueError, match=r"shape mismatch: g_Bxm.shape\[0\]"):
        gated_matvec(x, jnp.ones((3, M)), wu, impl="gpu_interpret")
    with pytest.raises(ValueError, match="activation='relu' is not one of"):
        gated_matvec(x, g, wu, activation="relu", impl="reference")
    with pytest.raises(ValueError, match=rf"threshold has shape \({M + 1},\).*\({M},\)"):
        gated_matvec(x, g, wu, threshold=jnp.ones(M + 1), impl="gpu_interpret")
    with pytest.raises(ValueError, match="power of 2"):
        gated_matvec(x, g, wu, impl="gpu_interpret", block_m=24)
    with pytest.raises(ValueError, match="block_m=20 .*multiple of 16"):
        gated_matvec(x, g, wu.astype(jnp.bfloat16), impl="tpu_interpret", block_m=20)
