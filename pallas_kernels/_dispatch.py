"""Shared plumbing for the Pallas kernels: backend choice, impl names, version shims.

Holds: the list of implementation names every kernel accepts and the rule that turns
``impl="auto"`` into one of them; argument checks shared by the kernels (shapes, dtypes,
block sizes); and the few places where the Pallas API differs between the jax versions
we run on (0.10.x on CPU, 0.11.x on CUDA), found by feature detection, not by version
numbers.

Leaves out: any kernel body. Nothing here imports model code.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

IMPLS: tuple[str, ...] = (
    "auto",
    "reference",
    "gpu",
    "tpu",
    "gpu_interpret",
    "tpu_interpret",
)

FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def resolve_impl(impl: str, *, fn_name: str) -> str:
    """Return the concrete implementation for `impl` ("auto" picks by backend)."""
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(
            f"{fn_name}: argument impl={impl!r} is not one of the allowed values "
            f"{', '.join(repr(i) for i in IMPLS)}."
        )
    if impl != "auto":
        return impl
    backend = jax.default_backend()
    if backend == "gpu" or backend == "cuda" or backend == "rocm":
        return "gpu"
    if backend == "tpu":
        return "tpu"
    return "reference"


# --------------------------------------------------------------------------- checks


def check_float(fn_name: str, name: str, a: Any) -> None:
    if jnp.dtype(a.dtype) not in FLOAT_DTYPES:
        raise ValueError(
            f"{fn_name}: {name} has dtype {a.dtype}; expected float32, bfloat16 or float16."
        )


def check_ndim(fn_name: str, name: str, a: Any, ndim: int, shape_name: str) -> None:
    if getattr(a, "ndim", None) != ndim:
        raise ValueError(
            f"{fn_name}: {name} must have {ndim} dimensions {shape_name}, got shape "
            f"{getattr(a, 'shape', None)}."
        )


def check_dim(fn_name: str, what: str, got: int, want: int) -> None:
    if got != want:
        raise ValueError(f"{fn_name}: shape mismatch: {what} is {got}, expected {want}.")


def check_block(fn_name: str, name: str, value: int, *, power_of_2: bool) -> None:
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{fn_name}: {name}={value!r} must be a positive int.")
    if power_of_2 and value & (value - 1):
        raise ValueError(
            f"{fn_name}: {name}={value} must be a power of 2 for the GPU (Triton) kernel."
        )


def threshold_row(fn_name: str, threshold: Any, k: int) -> jax.Array:
    """A threshold (scalar, or one per input channel) as a float32 array [1, k]."""
    t = jnp.asarray(threshold, jnp.float32)
    if t.ndim == 0:
        return jnp.broadcast_to(t, (1, k))
    if t.shape == (k,):
        return t.reshape(1, k)
    raise ValueError(
        f"{fn_name}: threshold must be a scalar or have shape ({k},) (one per input "
        f"channel), got shape {t.shape}."
    )


# ------------------------------------------------------------- Triton (GPU) lowering


def _triton_module():
    from jax.experimental.pallas import triton as plgpu

    return plgpu


def triton_compiler_params(num_warps: int | None, num_stages: int | None) -> Any:
    """Compiler params that select the Triton lowering (name changed across versions)."""
    plgpu = _triton_module()
    cls = getattr(plgpu, "CompilerParams", None) or plgpu.TritonCompilerParams
    return cls(num_warps=num_warps, num_stages=num_stages)


def _load_takes_idx() -> bool:
    params = inspect.signature(_triton_module().load).parameters
    return "idx" in params


def _load_takes_eviction() -> bool:
    return "eviction_policy" in inspect.signature(_triton_module().load).parameters


def masked_load(
    ref: Any, mask: jax.Array | None, other: float = 0.0, eviction: str | None = None
) -> jax.Array:
    """`ref[...]` where `mask` (None: everywhere), else `other`; masked-out elements are
    not read. `eviction` ("evict_first"/"evict_last") is the L2 cache hint of the load,
    dropped where this jax's load has no such argument.

    On jax <= 0.4.3x the load took an index argument (`pl.load(ref, idx, ...)`);
    later ones take a ref view (`plgpu.load(ref.at[...], ...)`).
    """
    plgpu = _triton_module()
    kw: dict[str, Any] = {}
    if mask is not None:
        kw = {"mask": mask, "other": other}
    if eviction is not None and _load_takes_eviction():
        kw["eviction_policy"] = eviction
    if _load_takes_idx():
        return plgpu.load(ref, (), **kw)
    return plgpu.load(ref, **kw)


def triton_dot(a: jax.Array, b: jax.Array, trans_b: bool = False) -> jax.Array:
    """`a @ b` (`a @ b.T` with `trans_b`) on the tensor cores inside a Triton kernel
    (float32 result; float32 inputs without TF32). Every dimension must be at least 16."""
    fn = getattr(_triton_module(), "dot", None) or pl.dot
    exact = a.dtype == jnp.float32 or b.dtype == jnp.float32
    return fn(a, b, trans_b=trans_b, allow_tf32=False if exact else None).astype(jnp.float32)


def masked_store(ref: Any, val: jax.Array, mask: jax.Array) -> None:
    plgpu = _triton_module()
    params = inspect.signature(plgpu.store).parameters
    if "idx" in params:
        plgpu.store(ref, (), val, mask=mask)
    else:
        plgpu.store(ref, val, mask=mask)


def static_indices(n: int) -> list[jax.Array]:
    """Indices 0..n-1 as traced int32 scalars; call at the kernel's top level.

    The interpret-mode discharge rules of load/atomic (jax 0.10) fail on the literal
    that a bare Python int becomes inside a kernel, and program_id has no interpret
    rule inside a loop body, so the indices are made here, outside any loop; the
    Triton lowering folds the `0 * program_id` away.
    """
    zero = 0 * pl.program_id(0)
    return [zero + i for i in range(n)]


def atomic_add(ref: Any, idx: Any, val: jax.Array, mask: jax.Array | None = None) -> None:
    """`ref[idx] += val` atomically (float32 refs). `mask`: only where True; the jax 0.10
    interpreter has no rule for masked atomics, so interpret-mode kernels pad the target
    instead and pass None."""
    if mask is None:
        _triton_module().atomic_add(ref, idx, val)
    else:
        _triton_module().atomic_add(ref, idx, val, mask=mask)


# --------------------------------------------------------------- Mosaic TPU lowering


def _tpu_module():
    from jax.experimental.pallas import tpu as pltpu

    return pltpu


def tpu_compiler_params(dimension_semantics: Sequence[str]) -> Any:
    pltpu = _tpu_module()
    cls = getattr(pltpu, "CompilerParams", None) or pltpu.TPUCompilerParams
    return cls(dimension_semantics=tuple(dimension_semantics))


def tpu_interpret_params() -> Any:
    """The TPU interpreter when this jax has one (it models DMAs and scalar prefetch)."""
    pltpu = _tpu_module()
    cls = getattr(pltpu, "InterpretParams", None) or getattr(pltpu, "TPUInterpretParams", None)
    if cls is None:
        return True
    try:
        # Boundary blocks hang over the array's end; read the overhang as NaN so a kernel
        # that forgets to mask it fails the tests.
        return cls(out_of_bounds_reads="uninitialized", uninitialized_memory="nan")
    except TypeError:
        return cls()


def prefetch_grid_spec(**kwargs: Any) -> Any:
    return _tpu_module().PrefetchScalarGridSpec(**kwargs)


def vmem(shape: tuple[int, ...], dtype: Any) -> Any:
    pltpu = _tpu_module()
    space = getattr(pltpu, "VMEM", None)
    if space is None:
        space = pltpu.MemorySpace.VMEM
    return space(shape, dtype)


def cdiv(a: int, b: int) -> int:
    return pl.cdiv(a, b)
