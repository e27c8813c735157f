"""The TPU (Mosaic) kernels on a CPU: every one lowers for TPU at the supported model
shapes (`jax.export(..., platforms=["tpu"])`, which runs Pallas' Mosaic lowering and its
block-shape checks, not libtpu's compiler), and in the TPU interpreter the matvec kernels
copy exactly the active weight rows, one DMA per row (counted by the kernels' own DMA
loop), for random sparsity patterns, while matching their references."""

from __future__ import annotations

import importlib
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental import pallas as pl

from pallas_kernels import (
    gated_matvec_reference,
    head_sparse_attention,
    sparse_input_matvec_reference,
)

smv = importlib.import_module("pallas_kernels.sparse_matvec")
gmv = importlib.import_module("pallas_kernels.gated_matvec")

# name: (d, m, H, Hkv, Dh, dtypes the model runs in). Gemma 3 270M: 4 heads of 256, 1 kv.
MODELS = {
    "smollm2": (576, 1536, 9, 3, 64, (jnp.float32, jnp.bfloat16)),
    "gemma3-270m": (640, 2048, 4, 1, 256, (jnp.float32, jnp.bfloat16)),
    "llama3-8b": (4096, 14336, 32, 8, 128, (jnp.bfloat16,)),
}
BATCHES = (1, 4, 8)
CASES = [(name, dt, b) for name, spec in MODELS.items() for dt in spec[5] for b in BATCHES]
IDS = [f"{n}-{jnp.dtype(dt).name}-B{b}" for n, dt, b in CASES]


def _lower_tpu(fn, *avals) -> str:
    text = export.export(jax.jit(fn), platforms=["tpu"])(*avals).mlir_module()
    assert "tpu_custom_call" in text
    return text


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("name,dtype,B", CASES, ids=IDS)
def test_every_tpu_kernel_lowers_at_model_shapes(name, dtype, B):
    d, m, H, Hkv, Dh, _ = MODELS[name]
    q, kv = H * Dh, Hkv * Dh
    x = lambda n: _sds((B, n), dtype)
    w = lambda k, n: _sds((k, n), dtype)
    # sparse_input_matvec: q, fused k/v, o, gate/up (TEAL), down, fused q/k/v; with the
    # fused threshold on one of them.
    for k_in, n_out in ((d, q), (d, 2 * kv), (q, d), (d, m), (m, d), (d, q + 2 * kv)):
        _lower_tpu(lambda a, b: smv._sparse_input_matvec_tpu(a, b), x(k_in), w(k_in, n_out))
    _lower_tpu(
        lambda a, b, t: smv._sparse_input_matvec_tpu(a, b, t),
        x(d),
        w(d, m),
        _sds((d,), jnp.float32),
    )
    # gated_matvec: up (and gate) rows [m, d], Deja Vu's q rows [q, d].
    for rows in (m, q):
        _lower_tpu(gmv._gated_matvec_tpu, x(d), x(rows), w(rows, d))
    # head-sparse attention over a [B, Hkv, S, Dh] cache: one slot block, and several with
    # a partial last one.
    for S in (256, 4100):
        _lower_tpu(
            lambda qq, hm, kc, vc, ok, n: head_sparse_attention(
                qq, hm, kc, vc, ok, kv_len=n, impl="tpu"
            ),
            _sds((B, H, Dh), dtype),
            _sds((B, H), jnp.bool_),
            _sds((B, Hkv, S, Dh), dtype),
            _sds((B, Hkv, S, Dh), dtype),
            _sds((B, S), jnp.bool_),
            _sds((), jnp.int32),
        )
    # with the o_proj input's threshold applied to the output (a decode step's o_in)
    _lower_tpu(
        lambda qq, hm, kc, vc, ok, n, t: head_sparse_attention(
            qq, hm, kc, vc, ok, kv_len=n, impl="tpu", threshold=t
        ),
        _sds((B, H, Dh), dtype),
        _sds((B, H), jnp.bool_),
        _sds((B, Hkv, 256, Dh), dtype),
        _sds((B, Hkv, 256, Dh), dtype),
        _sds((B, 256), jnp.bool_),
        _sds((), jnp.int32),
        _sds((H * Dh,), jnp.float32),
    )


def test_lowering_check_rejects_a_bad_block():
    """The check above can fail: a block squeezing the second-minor axis of a
    [B, S, Hkv, Dh] cache (the layout the old kernel used) is refused by the lowering."""

    def copy(k_ref, o_ref):
        o_ref[...] = k_ref[...]

    def f(kc):
        return pl.pallas_call(
            copy,
            out_shape=jax.ShapeDtypeStruct((2, 3, 64, 64), kc.dtype),
            grid=(2, 3),
            in_specs=[pl.BlockSpec((None, 64, None, 64), lambda b, h: (b, 0, h, 0))],
            out_specs=pl.BlockSpec((None, None, 64, 64), lambda b, h: (b, h, 0, 0)),
        )(kc)

    with pytest.raises(Exception, match="block shape"):
        _lower_tpu(f, _sds((2, 64, 3, 64), jnp.bfloat16))


def test_head_attention_gpu_kernel_lowers_to_triton():
    """The GPU kernel at SmolLM2's and Llama-3-8B's head shapes, with and without the
    output threshold, the slot splits and the new token's cache write, goes through the Triton lowering on a CPU (jax.export refuses to serialize Triton calls, so that check is
    switched off; the kernel body has been lowered by then)."""
    cases = itertools.product(((9, 3, 64), (32, 8, 128)), (False, True), (1, 4), (False, True))
    for (H, Hkv, Dh), thresholded, splits, writes in cases:

        def fn(q, hm, kc, vc, ok, n, t, on=thresholded, p=splits, w=writes):
            new = (kc[:, :, 0], vc[:, :, 0], n - 1) if w else None  # the cache update inside
            return head_sparse_attention(
                q,
                hm,
                kc,
                vc,
                ok,
                kv_len=n,
                impl="gpu",
                threshold=t if on else None,
                num_splits=p,
                new_kv=new,
            )

        exp = export.export(
            jax.jit(fn),
            platforms=["cuda"],
            disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
        )(
            _sds((4, H, Dh), jnp.bfloat16),
            _sds((4, H), jnp.bool_),
            _sds((4, Hkv, 300, Dh), jnp.bfloat16),
            _sds((4, Hkv, 300, Dh), jnp.bfloat16),
            _sds((4, 300), jnp.bool_),
            _sds((), jnp.int32),
            _sds((H * Dh,), jnp.float32),
        )
        assert "__gpu$xla.gpu.triton" in exp.mlir_module()


def test_head_attention_from_qkv_lowers_to_triton():
    """The packed GPU kernel (q|k|v read from a wider float32 accumulator, RoPE and the
    cache write inside) at SmolLM2's and Llama-3-8B's head shapes, with and without RoPE
    and the slot splits, fused q|k|v or q apart from k|v, goes through the Triton
    lowering on a CPU."""
    from pallas_kernels import head_sparse_attention_from_qkv

    cases = itertools.product(((9, 3, 64), (32, 8, 128)), (False, True), (1, 4), (False, True))
    for (H, Hkv, Dh), roped, splits, kv_apart in cases:
        width = (H + 2 * Hkv) * Dh

        def fn(src, hm, kc, vc, ok, n, cos, sin, r=roped, p=splits, h=H, d=Dh, a=kv_apart):
            return head_sparse_attention_from_qkv(
                src,
                128,
                hm,
                kc,
                vc,
                ok,
                n - 1,
                num_heads=h,
                dtype=jnp.bfloat16,
                kv=(src, 128 + h * d) if a else None,  # q apart from k|v (chess+)
                rope=(cos, sin) if r else None,
                kv_len=n,
                impl="gpu",
                num_splits=p,
            )

        exp = export.export(
            jax.jit(fn),
            platforms=["cuda"],
            disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
        )(
            _sds((4, 128 + width + 64), jnp.float32),
            _sds((4, H), jnp.bool_),
            _sds((4, Hkv, 300, Dh), jnp.bfloat16),
            _sds((4, Hkv, 300, Dh), jnp.bfloat16),
            _sds((4, 300), jnp.bool_),
            _sds((), jnp.int32),
            _sds((4, Dh), jnp.float32),
            _sds((4, Dh), jnp.float32),
        )
        assert "__gpu$xla.gpu.triton" in exp.mlir_module()


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_gated_matvec_gate_rule_lowers_to_triton(activation):
    """gated_matvec with the gate's activation and threshold inside (CHESS's decode step)
    goes through the Triton lowering at Llama-3-8B's FFN shape, batch 1 and 4."""
    from pallas_kernels import gated_matvec

    for B in (1, 4):
        fn = lambda x, pre, w, t: gated_matvec(
            x, pre, w, activation=activation, threshold=t, impl="gpu"
        )
        exp = export.export(
            jax.jit(fn),
            platforms=["cuda"],
            disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
        )(
            _sds((B, 4096), jnp.bfloat16),
            _sds((B, 14336), jnp.float32),
            _sds((14336, 4096), jnp.bfloat16),
            _sds((14336,), jnp.float32),
        )
        assert "__gpu$xla.gpu.triton" in exp.mlir_module()


@pytest.mark.parametrize("B", [1, 4])
def test_accumulator_kernels_lower_to_triton_in_place(B):
    """`sparse_input_matvec_into` and `sparse_input_matvecs_into` (chess+'s q and k|v in
    one launch) at Llama-3-8B's shapes go through the Triton lowering as one custom call
    each, whose output aliases the accumulator operand (the in-place add that lets a
    decode block's calls share one zero-fill)."""
    from pallas_kernels import accumulator_shape, sparse_input_matvec_into
    from pallas_kernels import sparse_input_matvecs_into as matvecs_into

    rows, span = accumulator_shape(B, 6144)
    acc, x = _sds((rows, 1024 + span), jnp.float32), _sds((B, 4096), jnp.bfloat16)
    wq, wkv = _sds((4096, 4096), jnp.bfloat16), _sds((4096, 2048), jnp.bfloat16)
    cases = [
        lambda a, x1, x2, w1, w2: sparse_input_matvec_into(a, 1024, x1, w1, impl="gpu"),
        lambda a, x1, x2, w1, w2: matvecs_into(a, 1024, [(x1, w1), (x2, w2)], impl="gpu"),
    ]
    for fn in cases:
        exp = export.export(
            jax.jit(fn),
            platforms=["cuda"],
            disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
        )(acc, x, x, wq, wkv)
        text = exp.mlir_module()
        assert text.count("@__gpu$xla.gpu.triton(") == 1
        assert "output_operand_alias" in text


# ------------------------------------------------------------- rows copied, interpreted

SPARSITIES = (0.25, 0.5, 0.9, 1.0)
K, N = 200, 256  # K not a multiple of the 32-row chunks; N split into two column blocks


def _pattern(key, shape, sparsity, dtype):
    """Normal values, each zeroed with probability `sparsity` (random, not block-aligned)."""
    k1, k2 = jax.random.split(key)
    v = jax.random.normal(k1, shape, jnp.float32)
    v = jnp.where(v == 0, 1.0, v)
    keep = jax.random.uniform(k2, shape) >= sparsity
    return jnp.where(keep, v, 0.0).astype(dtype)


def _close(got, want, dtype):
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.all(np.isfinite(got))
    assert np.linalg.norm(got - want) <= tol * max(np.linalg.norm(want), 1e-30)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rows_copied_are_the_active_rows(dtype):
    """Per sparsity: x (or g) with each entry zeroed independently, so that active rows
    are scattered; the kernels' DMA counters must equal the number of active rows (times
    the weights read per row and the column blocks), not a count of blocks."""
    B = 3
    for i, s in enumerate(SPARSITIES):
        key = jax.random.key(100 + i)
        kx, kw, kg, ku, kxx = jax.random.split(key, 5)
        x = _pattern(kx, (B, K), s, dtype)
        w = (jax.random.normal(kw, (K, N)) * K**-0.5).astype(dtype)
        active = int(jnp.sum(jnp.any(x != 0, axis=0)))
        y, copied = smv._sparse_input_matvec_tpu(
            x, w, block_k=32, block_n=128, interpret=True, count_copies=True
        )
        assert copied.tolist() == [active, active], f"s={s}: {copied} vs {active} rows"
        _close(y, sparse_input_matvec_reference(x, w), dtype)

        xx = (jax.random.normal(kxx, (B, 128))).astype(dtype)
        g = _pattern(kg, (B, K), s, dtype)
        wu = (jax.random.normal(ku, (K, 128)) * 128**-0.5).astype(dtype)
        active = int(jnp.sum(jnp.any(g != 0, axis=0)))
        h, copied = gmv._gated_matvec_tpu(xx, g, wu, block_m=32, interpret=True, count_copies=True)
        assert copied.tolist() == [active], f"gated s={s}"
        _close(h, gated_matvec_reference(xx, g, wu), dtype)
        if s == 1.0:
            assert active == 0 and not np.any(np.asarray(h, np.float32))


def test_tpu_block_n_fits_vmem_and_divides():
    # Llama-3-8B's up/gate projection in bf16: two 128-row buffers of all 14336 columns
    # would take 7 MiB; the kernel splits N into blocks of a multiple of 128 dividing N.
    assert smv.tpu_block_n(14336, 128, 2) == 7168
    assert smv.tpu_block_n(4096, 128, 2) == 4096
    assert smv.tpu_block_n(960, 128, 4) == 960  # SmolLM2's fused q/k/v: whole rows
