"""gated_matvec: every implementation against the reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import gated_matvec, gated_matvec_reference

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
    with pytest.raises(ValueError, match="power of 2"):
        gated_matvec(x, g, wu, impl="gpu_interpret", block_m=24)
    with pytest.raises(ValueError, match="block_m=20 .*multiple of 16"):
        gated_matvec(x, g, wu.astype(jnp.bfloat16), impl="tpu_interpret", block_m=20)
