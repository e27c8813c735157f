"""Row-granular weight reads for the TPU (Mosaic) kernels: only the active rows are copied.

Activation sparsity is unstructured, so a block of r weight rows is all-inactive with
probability s^r, nil at r >= 16 for s = 0.5: skipping whole blocks saves nothing. The TPU
kernels here copy single rows instead:

1. `compact_rows` (plain jnp, before the kernel) turns a per-row activity mask into a
   stable compacted list of the active row indices (ascending, int32, padded to whole
   chunks) and their count. Both are passed by scalar prefetch (`PrefetchScalarGridSpec`),
   so they sit in SMEM where the kernel's scalar core reads them.
2. Inside the kernel, `for_each_chunk` walks that list in chunks of `rows` entries, with
   two VMEM buffers: while chunk c is computed, the DMAs of chunk c + 1 are in flight. Each
   active row is one DMA (`pltpu.make_async_copy`) from the weight in HBM (memory space
   ANY, never blocked or pipelined by Pallas) into one row of a VMEM buffer. A chunk's
   trailing buffer rows past the count hold stale data; `chunk_row_valid` masks them.
3. With `counter` (debug), every DMA the loop starts adds 1 to an SMEM cell, so a test
   can check that the rows copied are exactly the active rows.

What was checked: these kernels lower for TPU through Pallas' Mosaic lowering
(`jax.export(..., platforms=["tpu"])` on a CPU) and run in the Pallas TPU interpreter;
they have never been compiled by libtpu's Mosaic compiler nor run on a TPU.

Leaves out: any kernel body; the kernels are in sparse_matvec.py and gated_matvec.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


def _pltpu():
    from jax.experimental.pallas import tpu as pltpu

    return pltpu


def sublane_rows(dtype: Any) -> int:
    """Rows in one sublane tile of `dtype`: 8 for 32-bit, 16 for 16-bit, 32 for 8-bit."""
    return 8 * max(1, 4 // jnp.dtype(dtype).itemsize)


def compact_rows(row_active_K: jax.Array, rows: int) -> tuple[jax.Array, jax.Array]:
    """The active row indices, ascending, then zeros; padded to whole chunks of `rows`.

    Returns (int32 [n_chunks * rows], int32 [1] count). A stable compaction by prefix sum
    and scatter (no sort).
    """
    (k,) = row_active_K.shape
    padded = pl.cdiv(k, rows) * rows
    active = row_active_K.astype(jnp.int32)
    slot = jnp.cumsum(active) - 1
    slot = jnp.where(active > 0, slot, padded)  # inactive rows are dropped
    ids = jnp.zeros((padded,), jnp.int32).at[slot].set(jnp.arange(k, dtype=jnp.int32), mode="drop")
    return ids, jnp.sum(active).reshape(1)


def compact_columns(a_BxK: jax.Array, ids: jax.Array, count: jax.Array, rows: int) -> jax.Array:
    """`a[:, ids]` as float32 [n_chunks, B, rows], zero past `count`: the chunk-major layout
    that a kernel indexes on its leading (untiled) axis with a dynamic chunk number."""
    b = a_BxK.shape[0]
    n = ids.shape[0]
    vals = jnp.take(a_BxK.astype(jnp.float32), ids, axis=1)
    vals = jnp.where(jnp.arange(n)[None, :] < count[0], vals, 0.0)
    return vals.reshape(b, n // rows, rows).transpose(1, 0, 2)


def chunk_row_valid(c: jax.Array, count: jax.Array, rows: int, axis: int) -> jax.Array:
    """Bool [rows, 1] (axis 0) or [1, rows] (axis 1): buffer rows of chunk c in use."""
    shape = (rows, 1) if axis == 0 else (1, rows)
    return c * rows + jax.lax.broadcasted_iota(jnp.int32, shape, axis) < count


def for_each_chunk(
    ids_ref: Any,
    count: jax.Array,
    rows: int,
    copies: list[tuple[Callable[[jax.Array], Any], Any]],
    sems: Any,
    body: Callable[[jax.Array, jax.Array], None],
    counter: Any = None,
) -> None:
    """Double-buffered walk over the compacted active rows, one DMA per row.

    `copies` holds, per weight, `(src_row, buf)`: `src_row(k)` is the HBM ref view of row
    k (shape [1, width]) and `buf` a VMEM scratch [2, rows, width]. `sems` is a DMA
    semaphore array [2] (one per buffer slot). `body(c, slot)` computes chunk c once its
    rows are in `buf[slot]`. `counter`, if given, is `(smem_ref, i)`: `smem_ref[i]` grows
    by one per DMA started.
    """
    # lax.div/rem, not // and %: jnp's floor semantics lower through `sign`, whose Mosaic
    # rule asks for the TPU generation (absent when lowering on a CPU); all operands are >= 0.
    n_chunks = jax.lax.div(count + rows - 1, rows)

    def rows_in(c):
        return jnp.minimum(rows, count - c * rows)

    def start(c, slot):
        def one(r, carry):
            k = ids_ref[c * rows + r]
            for src_row, buf in copies:
                _pltpu().make_async_copy(
                    src_row(k), buf.at[slot, pl.ds(r, 1)], sems.at[slot]
                ).start()
            if counter is not None:
                ref, i = counter
                ref[i] += len(copies)
            return carry

        jax.lax.fori_loop(0, rows_in(c), one, 0)

    def wait(c, slot):
        def one(r, carry):
            for src_row, buf in copies:
                _pltpu().make_async_copy(
                    src_row(0), buf.at[slot, pl.ds(0, 1)], sems.at[slot]
                ).wait()
            return carry

        jax.lax.fori_loop(0, rows_in(c), one, 0)

    @pl.when(n_chunks > 0)
    def _():
        start(0, 0)

    def step(c, carry):
        slot = jax.lax.rem(c, 2)

        @pl.when(c + 1 < n_chunks)
        def _():
            start(c + 1, 1 - slot)

        wait(c, slot)
        body(c, slot)
        return carry

    jax.lax.fori_loop(0, n_chunks, step, 0)


def any_spec() -> Any:
    """A BlockSpec that leaves the operand in HBM for the kernel's own DMAs."""
    space = getattr(pl, "ANY", None) or _pltpu().ANY
    return pl.BlockSpec(memory_space=space)


def smem_spec() -> Any:
    return pl.BlockSpec(memory_space=_pltpu().SMEM)


def dma_semaphores(n: int) -> Any:
    return _pltpu().SemaphoreType.DMA((n,))
