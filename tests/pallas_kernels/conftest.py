"""Helpers shared by the kernel tests (exposed as the `kt` fixture).

The implementations under test: the two interpret modes everywhere, plus the compiled
kernel of the backend we run on ("gpu" on a CUDA machine, "tpu" on a TPU).
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from parity import rel_err  # tests/parity.py

TOL = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 1e-2}


def impls_under_test() -> list[str]:
    """PALLAS_KERNELS_TEST_IMPLS (comma-separated) overrides, e.g. "gpu" on a GPU box
    where the interpret modes were already run on CPU."""
    from tiny import env_impls  # tests/tiny.py

    named = env_impls()
    if named:
        return named
    out = ["gpu_interpret", "tpu_interpret"]
    if jax.default_backend() == "gpu":
        out.append("gpu")
    if jax.default_backend() == "tpu":
        out.append("tpu")
    return out


def is_gpu_impl(impl: str) -> bool:
    return impl.startswith("gpu")


def assert_close(got, want, dtype, what=""):
    got_f = np.asarray(jnp.asarray(got, jnp.float32))
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert np.all(np.isfinite(got_f)), f"{what}: non-finite output (unwritten element?)"
    err = rel_err(got, want)
    assert err <= TOL[jnp.dtype(dtype)], f"{what}: relative error {err:.3g}"


def sparse_values(key, shape, sparsity, dtype):
    """Random normal values, each zeroed independently with probability `sparsity`
    (0 and 1 exact); never a stray zero elsewhere."""
    k1, k2 = jax.random.split(key)
    v = jax.random.normal(k1, shape, jnp.float32)
    v = jnp.where(v == 0, 1.0, v)
    if sparsity >= 1.0:
        keep = jnp.zeros(shape, bool)
    elif sparsity <= 0.0:
        keep = jnp.ones(shape, bool)
    else:
        keep = jax.random.uniform(k2, shape) >= sparsity
    return jnp.where(keep, v, 0.0).astype(dtype)


def normal(key, shape, dtype, scale=1.0):
    return (jax.random.normal(key, shape, jnp.float32) * scale).astype(dtype)


@pytest.fixture(scope="session")
def kt():
    return types.SimpleNamespace(
        TOL=TOL,
        impls=impls_under_test(),
        is_gpu_impl=is_gpu_impl,
        rel_err=rel_err,
        assert_close=assert_close,
        sparse_values=sparse_values,
        normal=normal,
    )


def pytest_generate_tests(metafunc):
    """Any test taking an `impl` argument runs once per implementation under test."""
    if "impl" in metafunc.fixturenames:
        metafunc.parametrize("impl", impls_under_test())
    if "gpu_impl" in metafunc.fixturenames:
        gpu = [i for i in impls_under_test() if i.startswith("gpu")]
        metafunc.parametrize(
            "gpu_impl",
            gpu or [pytest.param("gpu_interpret", marks=pytest.mark.skip("no GPU impl selected"))],
        )
