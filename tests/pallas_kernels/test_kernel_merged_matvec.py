"""merged_matvec_into: o_proj's split-K kernel merging a split decode attention's slot
ranges as its input, against the attention's own merge followed by the plain kernel, in
the GPU interpreter; its Triton lowering at Llama-3-8B's shapes; named errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from pallas_kernels import accumulator_shape, merged_matvec_into, sparse_input_matvec_reference
from pallas_kernels.head_sparse_attention import _merge_splits, threshold_per_head

# (B, P ranges, H, Dh, N): heads narrower than the kernel's 64-row blocks, half a block
# (several blocks per head), and two batch rows with an odd N
CASES = [(1, 4, 8, 16, 96), (1, 3, 4, 128, 600), (2, 2, 2, 64, 64)]


def _pieces(B, P, H, Dh, seed=0):
    """Random softmax pieces of P slot ranges; range 0 of head 0 saw no valid slot."""
    k = jax.random.split(jax.random.key(seed), 3)
    m = 3 * jax.random.normal(k[0], (B, P, H))
    l = 0.5 + 5 * jax.random.uniform(k[1], (B, P, H))
    m, l = m.at[:, 0, 0].set(-1e30), l.at[:, 0, 0].set(0.0)
    return jnp.stack([m, l], -1), jax.random.normal(k[2], (B, P, H, Dh))


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("threshold", ["none", "scalar", "channel"])
def test_merges_as_the_attention_does(case, dtype, threshold):
    """x (returned) is the attention's merge (`_merge_splits`, every head) rounded to the
    model's dtype and thresholded; y is x @ W added into the accumulator's columns from
    `col` on, the columns around them untouched."""
    B, P, H, Dh, N = case
    K = H * Dh
    ml, parts = _pieces(B, P, H, Dh)
    w = jax.random.normal(jax.random.key(1), (K, N)).astype(dtype)
    t = {
        "none": None,
        "scalar": jnp.float32(0.3),
        "channel": 0.6 * jax.random.uniform(jax.random.key(2), (K,)),
    }[threshold]
    rows, span = accumulator_shape(B, N)
    col = 512
    acc = jnp.full((rows, col + span + 512), 2.0, jnp.float32)
    y, acc2, x = merged_matvec_into(acc, col, (ml, parts), w, t, dtype=dtype, impl="gpu_interpret")
    jax.block_until_ready((y, acc2, x))
    every = jnp.ones((B, H), jnp.int32)
    th = None if t is None else threshold_per_head(t, H, Dh)
    want_x = _merge_splits(ml, parts, every, th, dtype).reshape(B, K)
    assert x.dtype == jnp.dtype(dtype) and x.shape == (B, K)
    xa, xb = np.asarray(x, np.float32), np.asarray(want_x, np.float32)
    # the ranges may be added in another order: within a rounding of the dtype
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    close = np.abs(xa - xb) <= tol * np.abs(xb) + 1e-6
    assert close.mean() >= 0.99, (xa[~close][:5], xb[~close][:5])
    assert np.all(np.isfinite(xa))  # head 0 has a range with no valid slot (m = -1e30, l = 0)
    if t is not None:
        assert 0.05 < float(np.mean(xa == 0)) < 0.95
    want_y = sparse_input_matvec_reference(x, w, out_dtype=jnp.float32) + 2.0
    np.testing.assert_allclose(np.asarray(y), np.asarray(want_y), rtol=2e-5, atol=2e-4)
    a2 = np.asarray(acc2)
    np.testing.assert_allclose(a2[:B, col : col + N], np.asarray(want_y), rtol=2e-5, atol=2e-4)
    assert np.all(a2[:, :col] == 2.0) and np.all(a2[:, col + span :] == 2.0)


def test_reference_impl_gives_the_kernels_result():
    B, P, H, Dh, N = CASES[1]
    ml, parts = _pieces(B, P, H, Dh, seed=3)
    w = jax.random.normal(jax.random.key(4), (H * Dh, N)).astype(jnp.bfloat16)
    rows, span = accumulator_shape(B, N)
    acc = jnp.zeros((rows, span), jnp.float32)
    got = merged_matvec_into(acc, 0, (ml, parts), w, 0.2, dtype=jnp.bfloat16, impl="gpu_interpret")
    want = merged_matvec_into(acc, 0, (ml, parts), w, 0.2, dtype=jnp.bfloat16, impl="reference")
    assert np.mean(np.asarray(got[2]) == np.asarray(want[2])) >= 0.99
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=1e-2, atol=1e-2)


def test_lowers_to_triton_in_place():
    """At Llama-3-8B's o_proj (32 heads of 128, 4 slot ranges) the kernel goes through
    the Triton lowering as one custom call whose output aliases the accumulator."""
    sds = jax.ShapeDtypeStruct

    def fn(a, ml, op, w, t):
        return merged_matvec_into(a, 10240, (ml, op), w, t, dtype=jnp.bfloat16, impl="gpu")

    exp = export.export(
        jax.jit(fn),
        platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(
        sds((1, 28672), jnp.float32),
        sds((1, 4, 32, 2), jnp.float32),
        sds((1, 4, 32, 128), jnp.float32),
        sds((4096, 4096), jnp.bfloat16),
        sds((4096,), jnp.float32),
    )
    text = exp.mlir_module()
    assert text.count("@__gpu$xla.gpu.triton(") == 1 and "output_operand_alias" in text


def test_bad_inputs_get_named_errors():
    ml, parts = _pieces(1, 2, 4, 16)
    w = jnp.zeros((64, 32), jnp.float32)
    acc = jnp.zeros((1, 512), jnp.float32)
    call = lambda **kw: merged_matvec_into(
        kw.pop("acc", acc),
        0,
        kw.pop("parts", (ml, parts)),
        kw.pop("w", w),
        kw.pop("t", None),
        dtype=jnp.float32,
        impl="gpu_interpret",
    )
    with pytest.raises(ValueError, match=r"parts\[1\] \(acc per range\) must have 4 dimensions"):
        call(parts=(ml, parts[0]))
    with pytest.raises(ValueError, match=r"parts\[0\]\.shape"):
        call(parts=(ml[:, :1], parts))
    with pytest.raises(ValueError, match=r"w_KxN\.shape\[0\] \(H \* Dh\)"):
        call(w=jnp.zeros((60, 32)))
    with pytest.raises(ValueError, match="threshold must be a scalar or have shape"):
        call(t=jnp.zeros((3,)))
    with pytest.raises(ValueError, match="acc .* is too small"):
        call(acc=jnp.zeros((1, 100), jnp.float32))
