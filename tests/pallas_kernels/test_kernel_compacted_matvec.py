"""compact_rows and the compacted-row matvec: the GPU kernels (interpret mode on CPU)
against their references and against `sparse_input_matvec_reference`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels import (
    compact_rows,
    compacted_input_matvec,
    compacted_matvec_into,
    sparse_input_matvec_reference,
)
from pallas_kernels.compacted_matvec import (
    accumulator_columns,
    accumulator_rows,
    default_segment,
)

K, N = 320, 200  # N not a multiple of the column block below
SPARSITIES = (0.0, 0.3, 0.5, 0.9, 1.0)
BLOCKS = {"block_k": 32, "block_n": 64}


def numpy_lists(x, t, segment):
    """The expected (ids, xc), written out with numpy: per segment the active rows (some
    batch row nonzero after the threshold) ascending, then -1."""
    xk = np.asarray(jnp.asarray(x, jnp.float32))
    if t is not None:
        tt = np.asarray(
            jnp.broadcast_to(jnp.asarray(t, jnp.float32).astype(x.dtype), (K,)), np.float32
        )
        xk = np.where(np.abs(xk) >= tt[None, :], xk, 0.0)
    active = np.any(xk != 0, axis=0)
    ids = np.full((K,), -1, np.int64)
    for g0 in range(0, K, segment):
        on = [k for k in range(g0, g0 + segment) if active[k]]
        ids[g0 : g0 + len(on)] = on
    xc = np.where(ids[None, :] >= 0, xk[:, np.maximum(ids, 0)], 0.0)
    return ids, xc


@pytest.mark.parametrize("segment", [None, 64, 160])
@pytest.mark.parametrize("B", [1, 3])
def test_lists_match_numpy(kt, gpu_impl, segment, B):
    t = jnp.abs(kt.normal(jax.random.key(3), (K,), jnp.float32)) * 0.5
    for s in SPARSITIES:
        x = kt.sparse_values(jax.random.key(int(s * 10) + B), (B, K), s, jnp.bfloat16)
        want_ids, want_xc = numpy_lists(x, t, segment or default_segment(K))
        for impl in (gpu_impl, "reference"):
            ids, xc = compact_rows(x, t, segment=segment, impl=impl)
            np.testing.assert_array_equal(np.asarray(ids), want_ids, err_msg=f"{impl} s={s}")
            np.testing.assert_array_equal(np.asarray(xc.astype(jnp.float32)), want_xc)
            assert xc.dtype == x.dtype


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("B,dot", [(1, None), (2, None), (2, False), (8, None)])
def test_matvec_matches_reference(kt, gpu_impl, dtype, B, dot):
    """Batch 1 row by row; from batch 2 on the tensor cores (dot None) or row by row."""
    w = kt.normal(jax.random.key(100 + B), (K, N), dtype)
    for seed in (0, 1):
        for s in SPARSITIES:
            x = kt.sparse_values(jax.random.key(seed * 10 + int(s * 10)), (B, K), s, dtype)
            want = sparse_input_matvec_reference(x, w)
            for segment in (None, 64):
                y = compacted_input_matvec(x, w, impl=gpu_impl, segment=segment, dot=dot, **BLOCKS)
                assert y.dtype == x.dtype
                kt.assert_close(y, want, dtype, f"B={B} s={s} seed={seed} segment={segment}")
            if s == 1.0:
                assert not np.any(np.asarray(y, np.float32)), "all-zero x must give y == 0"


@pytest.mark.parametrize("B", [1, 3])
def test_k_not_a_multiple_of_the_tile(kt, gpu_impl, B):
    """K = 300: the last tile of the list runs past K (masked), one segment of 300 and
    segments of 100 (neither a multiple of the 32-row tile)."""
    k = 300
    w = kt.normal(jax.random.key(20 + B), (k, N), jnp.bfloat16)
    for s in (0.0, 0.5, 0.9):
        x = kt.sparse_values(jax.random.key(int(s * 10) + B), (B, k), s, jnp.bfloat16)
        want = sparse_input_matvec_reference(x, w)
        for segment in (None, 100):
            y = compacted_input_matvec(x, w, impl=gpu_impl, segment=segment, **BLOCKS)
            kt.assert_close(y, want, jnp.bfloat16, f"B={B} s={s} segment={segment}")


def test_threshold_fused(kt):
    x = kt.normal(jax.random.key(5), (2, K), jnp.float32)
    w = kt.normal(jax.random.key(6), (K, N), jnp.float32)
    t = jnp.abs(kt.normal(jax.random.key(7), (K,), jnp.float32))
    want = sparse_input_matvec_reference(x, w, t)
    assert kt.rel_err(sparse_input_matvec_reference(x, w), want) > 0.05  # the threshold bites
    y = compacted_input_matvec(x, w, t, impl="gpu_interpret", out_dtype=jnp.float32, **BLOCKS)
    assert y.dtype == jnp.float32
    kt.assert_close(y, want, jnp.float32, "fused threshold")


def test_inactive_rows_are_not_read(kt):
    """Rows no batch row uses (a random, not block-aligned pattern) are NaN in W: the
    kernel loads only listed rows."""
    x = kt.normal(jax.random.key(8), (2, K), jnp.float32)
    dead = jax.random.uniform(jax.random.key(9), (K,)) < 0.6
    x = jnp.where(dead[None, :], 0.0, x)
    w = kt.normal(jax.random.key(10), (K, N), jnp.float32)
    w_poison = jnp.where(dead[:, None], jnp.nan, w)
    y = compacted_input_matvec(x, w_poison, impl="gpu_interpret", **BLOCKS)
    kt.assert_close(y, sparse_input_matvec_reference(x, w), jnp.float32, "poisoned rows")


@pytest.mark.parametrize("dot", [False, True])
def test_adds_into_given_columns(kt, dot):
    """The accumulator's other columns (and, on the tensor-core path, its padding rows)
    are left as they were; its own get the product added."""
    B = 2
    x = kt.sparse_values(jax.random.key(11), (B, K), 0.5, jnp.float32)
    w = kt.normal(jax.random.key(12), (K, N), jnp.float32)
    cols = accumulator_columns(N, BLOCKS["block_n"])
    rows = accumulator_rows(B, dot)
    assert rows == (16 if dot else B)
    acc = kt.normal(jax.random.key(13), (rows, 64 + cols), jnp.float32)
    ids, xc = compact_rows(x, impl="gpu_interpret")
    y, acc2 = compacted_matvec_into(acc, 64, ids, xc, w, impl="gpu_interpret", dot=dot, **BLOCKS)
    want = acc[:B, 64 : 64 + N] + sparse_input_matvec_reference(x, w, out_dtype=jnp.float32)
    kt.assert_close(y, want, jnp.float32, "added product")
    np.testing.assert_array_equal(np.asarray(acc2[:, :64]), np.asarray(acc[:, :64]))
    np.testing.assert_array_equal(np.asarray(acc2[B:]), np.asarray(acc[B:]))
    with pytest.raises(ValueError, match="acc must be float32"):
        compacted_matvec_into(acc[:, :100], 64, ids, xc, w, impl="gpu_interpret", **BLOCKS)
    if dot:
        with pytest.raises(ValueError, match=r"acc must be float32 \[>= 16"):
            compacted_matvec_into(acc[:B], 64, ids, xc, w, impl="gpu_interpret", **BLOCKS)


def test_bad_segment_is_named():
    x = jnp.ones((1, K), jnp.float32)
    with pytest.raises(ValueError, match="segment=7 must be a positive int dividing K=320"):
        compact_rows(x, segment=7, impl="gpu_interpret")


def test_default_segment():
    assert [default_segment(k) for k in (576, 1536, 4096, 14336)] == [576, 768, 1024, 1024]


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), sparsity=st.floats(0.0, 1.0), B=st.integers(1, 4))
def test_random_sparsity(kt, gpu_impl, seed, sparsity, B):
    x = kt.sparse_values(jax.random.key(seed), (B, K), sparsity, jnp.bfloat16)
    w = kt.normal(jax.random.fold_in(jax.random.key(seed), 1), (K, N), jnp.bfloat16)
    y = compacted_input_matvec(x, w, impl=gpu_impl, segment=64, **BLOCKS)
    kt.assert_close(y, sparse_input_matvec_reference(x, w), jnp.bfloat16, f"s={sparsity}")
