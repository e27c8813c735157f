"""residual_rms_norm: the GPU kernel (in the interpreter) against the reference, the
reference against the model's RMSNorm and threshold rule, the zero outputs, the Triton
lowering at the models' widths, and named errors for bad inputs."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from jaxsparse import rules
from jaxsparse.models.layers import RMSNorm
from pallas_kernels import residual_rms_norm, residual_rms_norm_reference

# (B, D): SmolLM2's d (not a power of 2), a power of 2, an odd width; B = 1 (decode) and 3
CASES = [(1, 576), (3, 256), (2, 100)]


def _inputs(B, D, dtype, seed=0, width=None):
    k = jax.random.split(jax.random.key(seed), 5)
    x = (3 * jax.random.normal(k[0], (B, D))).astype(dtype)
    # more rows and columns than read: a decode block's accumulator
    delta = jax.random.normal(k[1], (B + 2, (width or D) + 70), jnp.float32)
    scale = (1 + 0.2 * jax.random.normal(k[2], (D,))).astype(dtype)
    t_vec = 0.8 * jax.random.uniform(k[3], (D,))
    return x, delta, scale, t_vec


@pytest.mark.parametrize(
    "case,dtype,with_delta",
    list(itertools.product(CASES, [jnp.float32, jnp.bfloat16], [True, False])),
    ids=lambda v: str(v) if not hasattr(v, "dtype") else jnp.dtype(v).name,
)
def test_kernel_matches_reference(case, dtype, with_delta, gpu_impl):
    """Every output of the kernel equals the reference: the residual and the zeros
    bitwise, the norm and each thresholded copy (a scalar and a per-channel threshold)
    to within one rounding of the norm's dtype (the sum of squares may be added in
    another order). The reference and the interpreter run on the CPU: XLA on a GPU may
    skip a rounding to bfloat16 between two ops (excess precision), which the compiled
    kernel and the model on a CPU do not."""
    cpu = jax.devices("cpu")[0]
    B, D = case
    with jax.default_device(cpu):
        x, delta, scale, t_vec = _inputs(B, D, dtype)
    kw = {
        "eps": 1e-5,
        "delta": delta if with_delta else None,
        "delta_col": 37 if with_delta else 0,
        "thresholds": (jnp.float32(0.9), t_vec),
        "zeros": (
            (1, 5000),
            (B + 2, 300),
        ),  # 5000: two blocks of the kernel's zero-fill, one partial
    }
    if gpu_impl == "gpu_interpret":
        with jax.default_device(cpu):
            got = residual_rms_norm(x, scale, impl=gpu_impl, **kw)
    else:  # the compiled kernel, on the GPU
        gpu = jax.devices("gpu")[0]
        arrays = {k: jax.device_put(kw[k], gpu) for k in ("delta", "thresholds")}
        out = residual_rms_norm(*jax.device_put((x, scale), gpu), impl=gpu_impl, **kw | arrays)
        got = jax.device_put(out, cpu)
    jax.block_until_ready(got)
    with jax.default_device(cpu):
        want = residual_rms_norm_reference(x, scale, **kw)
    np.testing.assert_array_equal(np.asarray(got.residual), np.asarray(want.residual))
    for z, shape in zip(got.zeros, kw["zeros"], strict=True):
        assert z.shape == shape and z.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(z), np.zeros(shape, np.float32))
    ulp = 1e-6 if dtype == jnp.float32 else 1e-2
    for a, b in zip((got.normed, *got.kept), (want.normed, *want.kept), strict=True):
        assert a.dtype == scale.dtype and a.shape == (B, D)
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        close = np.abs(a - b) <= ulp * np.abs(b) + 1e-6
        # a norm one rounding apart may land on the other side of a threshold: rare
        assert close.mean() >= 0.995, (a[~close][:5], b[~close][:5])
    # the thresholded copies zero what the rule zeroes, and keep the rest
    for kept, t in zip(got.kept, (0.9, t_vec)):
        normed = np.asarray(got.normed, np.float32)
        t = np.broadcast_to(np.asarray(jnp.asarray(t).astype(dtype), np.float32), normed.shape)
        np.testing.assert_array_equal(
            np.asarray(kept, np.float32), np.where(np.abs(normed) >= t, normed, 0.0)
        )
    assert 0.2 < float(np.mean(np.asarray(got.kept[1]) == 0)) < 0.9  # some of each


def test_reference_is_the_models_norm_and_threshold():
    """The reference gives what a decode block computes in XLA: the residual add in the
    model's dtype, `RMSNorm`, then `rules.sparsify`."""
    B, D = 2, 576
    x, delta, scale, t_vec = _inputs(B, D, jnp.bfloat16, seed=3)
    out = residual_rms_norm_reference(
        x, scale, eps=1e-6, delta=delta, delta_col=5, thresholds=(t_vec,)
    )
    r = x + delta[:B, 5 : 5 + D].astype(x.dtype)
    norm = RMSNorm(1e-6, jnp.bfloat16)
    h = norm.apply({"params": {"scale": scale}}, r[:, None])[:, 0]
    np.testing.assert_array_equal(np.asarray(out.residual), np.asarray(r))
    np.testing.assert_array_equal(np.asarray(out.normed), np.asarray(h))
    np.testing.assert_array_equal(np.asarray(out.kept[0]), np.asarray(rules.sparsify(h, t_vec)))


def test_outputs_asked_for():
    """Without delta the residual is x itself (no copy); `normed=False` leaves the norm
    out; no thresholds, no copies."""
    x, _, scale, t_vec = _inputs(1, 256, jnp.float32)
    out = residual_rms_norm(
        x, scale, eps=1e-5, normed=False, thresholds=(t_vec,), impl="gpu_interpret"
    )
    assert out.residual is x and out.normed is None and len(out.kept) == 1 and out.zeros == ()
    out = residual_rms_norm(x, scale, eps=1e-5, impl="tpu")  # the reference on a TPU
    assert out.kept == () and out.normed.shape == (1, 256)


@pytest.mark.parametrize("D", [576, 4096])
def test_kernel_lowers_to_triton(D):
    """At SmolLM2's and Llama-3-8B's widths, with a block's three accumulators to zero,
    the kernel goes through the Triton lowering on a CPU as one custom call."""
    sds = jax.ShapeDtypeStruct

    def fn(x, d, s, t1, t2):
        return residual_rms_norm(
            x,
            s,
            eps=1e-5,
            delta=d,
            delta_col=6144,
            thresholds=(t1, t2),
            zeros=((1, 28672),) * 3,
            impl="gpu",
        )

    exp = export.export(
        jax.jit(fn),
        platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(
        sds((1, D), jnp.bfloat16),
        sds((1, 28672), jnp.float32),
        sds((D,), jnp.bfloat16),
        sds((), jnp.float32),
        sds((D,), jnp.float32),
    )
    assert exp.mlir_module().count("@__gpu$xla.gpu.triton(") == 1


def test_bad_inputs_get_named_errors():
    x, delta, scale, t_vec = _inputs(2, 64, jnp.float32)
    call = lambda **kw: residual_rms_norm(
        kw.pop("x", x), kw.pop("scale", scale), eps=1e-5, impl="gpu_interpret", **kw
    )
    with pytest.raises(ValueError, match="x_BxD must have 2 dimensions"):
        call(x=x[None])
    with pytest.raises(ValueError, match="scale_D's length"):
        call(scale=scale[:10])
    with pytest.raises(ValueError, match="delta has 1 rows, fewer than x's 2"):
        call(delta=delta[:1])
    with pytest.raises(ValueError, match="delta has dtype bfloat16"):
        call(delta=delta.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match=r"delta_col=100 .* pass a column in \[0, 70\]"):
        call(delta=delta, delta_col=100)
    with pytest.raises(ValueError, match="delta_col=3 given without delta"):
        call(delta_col=3)
    with pytest.raises(ValueError, match=r"threshold must be a scalar or have shape \(64,\)"):
        call(thresholds=(t_vec[:3],))
    with pytest.raises(ValueError, match="zeros must be"):
        call(zeros=((1, 0),))
    with pytest.raises(ValueError, match="impl='cuda'"):
        residual_rms_norm(x, scale, eps=1e-5, impl="cuda")
