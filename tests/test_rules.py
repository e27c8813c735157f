"""jaxsparse.rules: the top-k keep-mask by counting (radix select) against the sort."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsparse.rules import kth_largest_by_count, topk_mask, topk_mask_sorted


def scores(kind: str, shape, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    if kind == "ties":  # many equal values, ties at the k-th largest
        x = np.round(x * 4) / 4
    elif kind == "signed_zeros_inf":  # -0.0 ties +0.0; infinities order like numbers
        x[..., ::7] = 0.0
        x[..., 1::7] = -0.0
        x[..., 2::11] = -np.inf
        x[..., 3::13] = np.inf
    elif kind == "negative":
        x = -np.abs(x) - 1.0
    return x


@pytest.mark.parametrize(
    "kind,shape,bits",
    [
        (kind, shape, 8)
        for kind in ("normal", "ties", "signed_zeros_inf", "negative")
        for shape in ((1, 1536), (3, 1, 600), (2, 4, 1024))
    ]
    + [(kind, (2, 4, 1024), 1) for kind in ("normal", "ties", "signed_zeros_inf", "negative")],
)
def test_count_gives_the_sorts_mask(kind, shape, bits):
    """Every k from 0 to past the width, 8 bits per counting pass (a GPU's) or 1 (a CPU's):
    the same mask as the sort, ties kept alike; with no ties exactly k entries (and the k
    largest)."""
    x = jnp.asarray(scores(kind, shape, seed=len(kind) + shape[-1]))
    width = shape[-1]
    count = jax.jit(lambda s, k: topk_mask(s, k, select="count", radix_bits=bits))
    for k in (0, 1, 2, 7, width // 3, width // 2, width - 1, width, width + 5):
        got = np.asarray(count(x, k))
        want = np.asarray(topk_mask_sorted(x, k))
        np.testing.assert_array_equal(got, want, err_msg=f"{kind} k={k}")
        if kind == "normal":
            assert (got.sum(-1) == min(k, width)).all()
            if 0 < k <= width:
                kth = -np.sort(-np.asarray(x), axis=-1)[..., k - 1 : k]
                assert (np.asarray(x)[got].min() >= kth.min()) and got[np.asarray(x) > kth].all()


def test_count_takes_a_traced_k():
    """k is data: one compiled function serves every k."""
    x = jnp.asarray(scores("normal", (3, 700), seed=1))
    f = jax.jit(lambda s, k: topk_mask(s, k, select="count"))
    for k in (1, 350, 700):
        np.testing.assert_array_equal(np.asarray(f(x, jnp.int32(k))).sum(-1), [k] * 3)
    assert f._cache_size() == 1
    keys = jax.lax.bitcast_convert_type(jnp.asarray([[1.0, 3.0, 2.0]]), jnp.uint32)
    kth = kth_largest_by_count(keys, jnp.asarray([2]))  # positives: the bits keep the order
    assert jax.lax.bitcast_convert_type(kth, jnp.float32)[0] == 2.0


def test_auto_sorts_on_cpu_and_rejects_unknown_select():
    """On a CPU "auto" is the sort (a decode step's counting passes would compile for
    seconds), "count" counts one bit per pass there; a typo in `select` or an unsupported
    bit width is an error, not a silent fallback."""
    x = jnp.asarray(scores("normal", (1, 2048), seed=2))
    assert "sort" in str(jax.make_jaxpr(lambda s: topk_mask(s, 100))(x))
    counted = str(jax.make_jaxpr(lambda s: topk_mask(s, 100, select="count"))(x))
    assert "sort" not in counted and counted.count("reduce_sum") >= 32  # 1 bit per pass
    with pytest.raises(ValueError, match="select='radix'"):
        topk_mask(x, 3, select="radix")
    with pytest.raises(ValueError, match="bits=3"):
        topk_mask(x, 3, select="count", radix_bits=3)
