"""sparse_input_matvec: every implementation against the reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental import pallas as pl

from pallas_kernels import (
    accumulator_shape,
    sparse_input_matvec,
    sparse_input_matvec_into,
    sparse_input_matvec_reference,
    sparse_input_matvecs_into,
)
from pallas_kernels._dispatch import resolve_impl

K, N = 300, 200  # not multiples of any block size used below
SPARSITIES = (0.0, 0.5, 0.9, 1.0)


def blocks(impl):
    return (
        {"block_k": 64, "block_n": 64}
        if impl.startswith("gpu")
        else {"block_k": 32}  # TPU: 32 compacted rows per chunk, whole rows of N
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("B", [1, 3, 8])
def test_matches_reference(kt, impl, dtype, B):
    w = kt.normal(jax.random.key(100 + B), (K, N), dtype)
    for seed in (0, 1):
        for s in SPARSITIES:
            x = kt.sparse_values(jax.random.key(seed * 10 + int(s * 10)), (B, K), s, dtype)
            y = sparse_input_matvec(x, w, impl=impl, **blocks(impl))
            want = sparse_input_matvec_reference(x, w)
            assert y.dtype == x.dtype
            kt.assert_close(y, want, dtype, f"{impl} B={B} s={s} seed={seed}")
            if s == 1.0:
                assert not np.any(np.asarray(y, np.float32)), "all-zero x must give y == 0"


@pytest.mark.parametrize("split_k", [1, 2, 5, None])
def test_gpu_split_k(kt, gpu_impl, split_k):
    x = kt.sparse_values(jax.random.key(3), (2, K), 0.5, jnp.float32)
    w = kt.normal(jax.random.key(4), (K, N), jnp.float32)
    y = sparse_input_matvec(x, w, impl=gpu_impl, block_k=32, block_n=128, split_k=split_k)
    kt.assert_close(y, sparse_input_matvec_reference(x, w), jnp.float32, f"split_k={split_k}")


@pytest.mark.parametrize("per_channel", [False, True])
def test_threshold_fused_equals_premasked(kt, impl, per_channel):
    B = 4
    x = kt.normal(jax.random.key(5), (B, K), jnp.float32)
    w = kt.normal(jax.random.key(6), (K, N), jnp.float32)
    if per_channel:
        t = jnp.abs(kt.normal(jax.random.key(7), (K,), jnp.float32))
    else:
        t = jnp.float32(0.8)
    # entries exactly at the threshold are kept (abs(x) < t is zeroed)
    tk = jnp.broadcast_to(t, (K,))
    x = x.at[0, :7].set(tk[:7]).at[1, 7:14].set(-tk[7:14])
    pre = jnp.where(jnp.abs(x) >= tk[None, :], x, 0.0)
    assert float(jnp.mean(pre == 0)) > 0.2
    y = sparse_input_matvec(x, w, t, impl=impl, **blocks(impl))
    want = sparse_input_matvec_reference(pre, w)
    kt.assert_close(y, want, jnp.float32, f"{impl} fused threshold")
    # the reference's own fused path agrees too
    kt.assert_close(sparse_input_matvec_reference(x, w, t), want, jnp.float32, "reference")


def test_threshold_compared_in_x_dtype(kt, impl):
    """A float32 threshold is rounded to x's dtype before the compare, as
    `jaxsparse.rules.sparsify` compares (the masked dense path): with bf16 x, an entry
    equal to bf16(t) is kept even where t itself is a little larger. A decode step
    passes o_proj's float32 thresholds to the kernel as they are."""
    from jaxsparse.rules import sparsify

    B = 2
    x = kt.normal(jax.random.key(11), (B, K), jnp.bfloat16)
    w = kt.normal(jax.random.key(12), (K, N), jnp.bfloat16)
    t = jnp.full((K,), 1.0 + 2.0**-10, jnp.float32)  # bf16(t) == 1.0 < t
    x = x.at[0, 5:45].set(1.0).at[1, 100:140].set(-1.0)
    pre = sparsify(x, t)
    assert int(jnp.sum(pre[0, 5:45] != 0)) == 40  # kept: |x| >= bf16(t)
    f32_pre = jnp.where(jnp.abs(x.astype(jnp.float32)) >= t, x, 0)
    assert int(jnp.sum(f32_pre[0, 5:45] != 0)) == 0  # a float32 compare would drop them
    want = sparse_input_matvec_reference(pre, w)
    y = sparse_input_matvec(x, w, t, impl=impl, **blocks(impl))
    kt.assert_close(y, want, jnp.bfloat16, f"{impl} threshold in bf16")
    assert kt.rel_err(sparse_input_matvec_reference(f32_pre, w), want) > 0.05  # the test bites
    kt.assert_close(sparse_input_matvec_reference(x, w, t), want, jnp.bfloat16, "reference")


def test_inactive_rows_are_not_read(kt, impl):
    """Rows of W that no batch row uses (a random, not block-aligned pattern) are poisoned
    with NaN: the GPU kernel must never load them (masked rows), the TPU kernel never
    copy them (one DMA per active row)."""
    B = 2
    x = kt.normal(jax.random.key(8), (B, K), jnp.float32)
    dead = jax.random.uniform(jax.random.key(9), (K,)) < 0.6
    x = jnp.where(dead[None, :], 0.0, x)
    w = kt.normal(jax.random.key(10), (K, N), jnp.float32)
    w_poison = jnp.where(dead[:, None], jnp.nan, w)
    y = sparse_input_matvec(x, w_poison, impl=impl, **blocks(impl))
    kt.assert_close(y, sparse_input_matvec_reference(x, w), jnp.float32, f"{impl} poisoned rows")


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), sparsity=st.floats(0.0, 1.0))
def test_random_sparsity_gpu(kt, gpu_impl, seed, sparsity):
    x = kt.sparse_values(jax.random.key(seed), (2, K), sparsity, jnp.bfloat16)
    w = kt.normal(jax.random.fold_in(jax.random.key(seed), 1), (K, N), jnp.bfloat16)
    y = sparse_input_matvec(x, w, impl=gpu_impl, block_k=64, block_n=64)
    kt.assert_close(y, sparse_input_matvec_reference(x, w), jnp.bfloat16, f"seed={seed}")


@pytest.mark.parametrize("B", [1, 2, 5, 8])
@pytest.mark.parametrize("dot", [False, True])
def test_gpu_paths_per_row_and_tensor_core(kt, gpu_impl, B, dot):
    """Both GPU reductions (batch rows one by one; the batch as one tensor-core tile,
    padded to 16 rows) read the union of active rows: each batch row its own random (not
    block-aligned) pattern, with the rows nobody uses poisoned with NaN, fp32 and bf16, and
    the unrolled and looped forms of several tiles per program."""
    for dtype in (jnp.float32, jnp.bfloat16):
        x = kt.sparse_values(jax.random.key(20 + B), (B, K), 0.7, dtype)
        w = kt.normal(jax.random.key(21), (K, N), dtype)
        unused = ~jnp.any(x != 0, axis=0)
        poisoned = jnp.where(unused[:, None], jnp.nan, w)
        want = sparse_input_matvec_reference(x, w)
        for split_k, unroll in ((None, None), (3, True), (3, False)):
            y = sparse_input_matvec(
                x,
                poisoned,
                impl=gpu_impl,
                block_k=32,
                block_n=64,
                dot=dot,
                split_k=split_k,
                unroll=unroll,
            )
            kt.assert_close(y, want, dtype, f"B={B} dot={dot} split={split_k} unroll={unroll}")


@pytest.mark.parametrize("impl_name", ["reference", "gpu_interpret", "tpu_interpret"])
def test_out_dtype_float32_is_the_unrounded_sum(kt, impl_name):
    """out_dtype=float32 (what the models ask for) returns the float32 accumulation
    itself, not the bf16-rounded result cast back."""
    x = kt.sparse_values(jax.random.key(30), (2, K), 0.5, jnp.bfloat16)
    w = kt.normal(jax.random.key(31), (K, N), jnp.bfloat16)
    y32 = sparse_input_matvec(x, w, impl=impl_name, out_dtype=jnp.float32, **blocks(impl_name))
    y16 = sparse_input_matvec(x, w, impl=impl_name, **blocks(impl_name))
    want = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32), precision="highest")
    assert y32.dtype == jnp.float32 and y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y32), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(y16.astype(jnp.float32) - want))) > 1e-4  # bf16 rounding
    with pytest.raises(ValueError, match="out_dtype"):
        sparse_input_matvec(x, w, impl=impl_name, out_dtype=jnp.int32)


def test_interpreters_poison_unwritten_outputs():
    """The tests above rely on unwritten outputs coming back as NaN (then assert_close
    fails): check that both interpreters really do that."""

    def writes_nothing(x_ref, o_ref):
        del x_ref, o_ref

    x = jnp.ones((8, 128), jnp.float32)
    out = jax.ShapeDtypeStruct((8, 128), jnp.float32)
    y = pl.pallas_call(writes_nothing, out_shape=out, interpret=True)(x)
    assert np.all(np.isnan(np.asarray(y)))
    from pallas_kernels._dispatch import tpu_interpret_params

    y = pl.pallas_call(writes_nothing, out_shape=out, interpret=tpu_interpret_params())(x)
    assert np.all(np.isnan(np.asarray(y)))


def test_bad_inputs():
    x = jnp.ones((2, K), jnp.float32)
    w = jnp.ones((K, N), jnp.float32)
    with pytest.raises(ValueError, match="impl='cuda'.*allowed values"):
        sparse_input_matvec(x, w, impl="cuda")
    with pytest.raises(ValueError, match="shape mismatch"):
        sparse_input_matvec(x, jnp.ones((K + 1, N)), impl="reference")
    with pytest.raises(ValueError, match="2 dimensions"):
        sparse_input_matvec(x[0], w, impl="gpu_interpret")
    with pytest.raises(ValueError, match="threshold"):
        sparse_input_matvec(x, w, jnp.ones((K - 1,)), impl="tpu_interpret")
    with pytest.raises(ValueError, match="power of 2"):
        sparse_input_matvec(x, w, impl="gpu_interpret", block_k=48)
    with pytest.raises(ValueError, match="dtype"):
        sparse_input_matvec(x.astype(jnp.int32), w, impl="reference")
    with pytest.raises(ValueError, match="GPU kernel only"):
        sparse_input_matvec(x, w, impl="tpu_interpret", split_k=2)
    with pytest.raises(ValueError, match="block_n=128 must equal N"):
        sparse_input_matvec(x, w, impl="tpu_interpret", block_n=128)  # 128 does not divide 200
    with pytest.raises(ValueError, match="tensor-core path"):
        sparse_input_matvec(x, w, impl="gpu_interpret", block_k=8, block_n=64)  # batch 2: dot
    with pytest.raises(ValueError, match="block_k=12 .*multiple of 8"):
        sparse_input_matvec(x, w, impl="tpu_interpret", block_k=12)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("B", [1, 3])
def test_into_adds_each_product_into_its_own_columns(kt, impl, dtype, B):
    """Two products share one accumulator that already holds values: each call adds its
    product into its own columns (with a per-channel threshold on the second), returns
    those columns, and leaves every other column as it was."""
    N2 = 70
    w1 = kt.normal(jax.random.key(7), (K, N), dtype)
    w2 = kt.normal(jax.random.key(8), (K, N2), dtype)
    x = kt.sparse_values(jax.random.key(9), (B, K), 0.5, dtype)
    t = jnp.abs(kt.normal(jax.random.key(10), (K,), jnp.float32, 0.5))
    bn = blocks(impl).get("block_n", 64)
    rows, span1 = accumulator_shape(B, N, block_n=bn)
    _, span2 = accumulator_shape(B, N2, block_n=bn)
    assert span1 == 256 and span2 == 128 and rows == (1 if B == 1 else 16)
    acc0 = kt.normal(jax.random.key(11), (rows, span1 + span2 + 5), jnp.float32)
    kw = blocks(impl) if kt.is_gpu_impl(impl) else {}
    y1, acc = sparse_input_matvec_into(acc0, 0, x, w1, impl=impl, **kw)
    y2, acc = sparse_input_matvec_into(acc, span1, x, w2, t, impl=impl, **kw)
    p1 = sparse_input_matvec_reference(x, w1, out_dtype=jnp.float32)
    p2 = sparse_input_matvec_reference(x, w2, t, out_dtype=jnp.float32)
    assert y1.dtype == y2.dtype == jnp.float32
    kt.assert_close(y1, acc0[:B, :N] + p1, dtype, f"{impl} first product")
    kt.assert_close(y2, acc0[:B, span1 : span1 + N2] + p2, dtype, f"{impl} second product")
    np.testing.assert_array_equal(acc[:B, :N], y1)
    np.testing.assert_array_equal(acc[:B, span1 : span1 + N2], y2)
    untouched = np.ones(acc.shape, bool)
    untouched[:B, :N] = untouched[:B, span1 : span1 + N2] = False
    np.testing.assert_array_equal(np.asarray(acc)[untouched], np.asarray(acc0)[untouched])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("B", [1, 3])
def test_matvecs_into_runs_products_with_their_own_inputs_side_by_side(kt, impl, dtype, B):
    """Two products, each with its own input (one sparse, one dense) and weight, in one
    call: each lands in its own columns, as two `sparse_input_matvec_into` calls would put
    it; the other columns keep what they held."""
    N2 = 70
    x1 = kt.sparse_values(jax.random.key(12), (B, K), 0.6, dtype)
    x2 = kt.sparse_values(jax.random.key(13), (B, K), 0.0, dtype)
    w1 = kt.normal(jax.random.key(14), (K, N), dtype)
    w2 = kt.normal(jax.random.key(15), (K, N2), dtype)
    kw = blocks(impl) if kt.is_gpu_impl(impl) else {}
    bn = kw.get("block_n", 512)
    rows, span1 = accumulator_shape(B, N, block_n=bn)
    _, span2 = accumulator_shape(B, N2, block_n=bn)
    col = 3
    acc0 = kt.normal(jax.random.key(16), (rows, col + span1 + span2 + 2), jnp.float32)
    (y1, y2), acc = sparse_input_matvecs_into(acc0, col, [(x1, w1), (x2, w2)], impl=impl, **kw)
    p1 = sparse_input_matvec_reference(x1, w1, out_dtype=jnp.float32)
    p2 = sparse_input_matvec_reference(x2, w2, out_dtype=jnp.float32)
    c2 = col + span1
    kt.assert_close(y1, acc0[:B, col : col + N] + p1, dtype, f"{impl} first product")
    kt.assert_close(y2, acc0[:B, c2 : c2 + N2] + p2, dtype, f"{impl} second product")
    np.testing.assert_array_equal(acc[:B, col : col + N], y1)
    np.testing.assert_array_equal(acc[:B, c2 : c2 + N2], y2)
    untouched = np.ones(acc.shape, bool)
    untouched[:B, col : col + N] = untouched[:B, c2 : c2 + N2] = False
    np.testing.assert_array_equal(np.asarray(acc)[untouched], np.asarray(acc0)[untouched])


def test_matvecs_into_refuses_mismatched_pairs():
    x = jnp.ones((1, K), jnp.float32)
    w = jnp.ones((K, N), jnp.float32)
    acc = jnp.zeros((1, 1024), jnp.float32)
    with pytest.raises(ValueError, match="pairs is empty"):
        sparse_input_matvecs_into(acc, 0, [], impl="gpu_interpret")
    with pytest.raises(ValueError, match="pair 1 has x float32\\(2, 300\\)"):
        sparse_input_matvecs_into(acc, 0, [(x, w), (x.repeat(2, 0), w)], impl="gpu_interpret")
    with pytest.raises(ValueError, match="shape mismatch"):
        sparse_input_matvecs_into(acc, 0, [(x, w), (x, w[:-1])], impl="reference")
    with pytest.raises(ValueError, match="too small"):  # 256 + 256 columns past 600
        sparse_input_matvecs_into(acc, 600, [(x, w), (x, w)], impl="gpu_interpret", block_n=128)


def test_into_refuses_a_target_it_cannot_add_into():
    x = jnp.ones((1, K), jnp.float32)
    w = jnp.ones((K, N), jnp.float32)
    small = jnp.zeros((1, 255), jnp.float32)  # N=200 in blocks of 128 needs 256 columns
    with pytest.raises(ValueError, match=r"too small.*columns \[0, 256\).*accumulator_shape"):
        sparse_input_matvec_into(small, 0, x, w, impl="gpu_interpret", block_n=128)
    with pytest.raises(ValueError, match=r"too small.*columns \[100, 300\)"):
        sparse_input_matvec_into(jnp.zeros((1, 299)), 100, x, w, impl="reference")
    with pytest.raises(ValueError, match=r"too small.*rows \[0, 16\)"):  # batch 2: 16 rows
        sparse_input_matvec_into(jnp.zeros((2, 512)), 0, x.repeat(2, 0), w, impl="gpu_interpret")
    with pytest.raises(ValueError, match="float32"):
        sparse_input_matvec_into(jnp.zeros((1, 512), jnp.bfloat16), 0, x, w, impl="reference")
    with pytest.raises(ValueError, match="col=-1"):
        sparse_input_matvec_into(jnp.zeros((1, 512)), -1, x, w, impl="gpu_interpret")


def test_auto_picks_by_backend(monkeypatch):
    assert resolve_impl("reference", fn_name="f") == "reference"
    for backend, want in (("cpu", "reference"), ("gpu", "gpu"), ("tpu", "tpu")):
        monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
        assert resolve_impl("auto", fn_name="f") == want
