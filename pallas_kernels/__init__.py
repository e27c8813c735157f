"""Pallas kernels for activation-sparse decoding.

Each kernel is a pure function with a pure-jnp `*_reference` of the same signature, a GPU
(Pallas/Triton) and a TPU (Pallas/Mosaic) implementation, and a dispatcher that picks by
`jax.default_backend()` (`impl=` forces one; "gpu_interpret" and "tpu_interpret" run the
kernels in Pallas interpret mode, e.g. on CPU). The TPU matvec kernels copy single active
weight rows by DMA from a prefetched list of row indices (pallas_kernels/_row_dma.py).
The TPU kernels are lowered for TPU and run in the interpreter by the tests on a CPU; they
have not been compiled by libtpu or run on a TPU. The compacted-row matvec
(pallas_kernels/compacted_matvec.py: a list of active rows, then full tiles of them) is a
GPU kernel; elsewhere it runs its jnp reference.

No model code here (no projections; the decode attention kernel applies RoPE and writes
the KV cache, and `residual_rms_norm` does a decode block's residual add, RMSNorm and
input thresholds, as the model would, when asked to); `jaxsparse` imports from this
package, never the reverse. `residual_rms_norm` has a GPU kernel only: on a TPU (and with
`impl="tpu"`) it runs its jnp reference, which XLA fuses.
"""

from pallas_kernels._dispatch import IMPLS
from pallas_kernels.compacted_matvec import (
    compact_rows,
    compact_rows_reference,
    compacted_input_matvec,
    compacted_matvec_into,
)
from pallas_kernels.gated_matvec import gated_matvec, gated_matvec_reference
from pallas_kernels.head_sparse_attention import (
    head_mask_from_indices,
    head_sparse_attention,
    head_sparse_attention_from_qkv,
    head_sparse_attention_reference,
)
from pallas_kernels.rms_norm import RmsNormOut, residual_rms_norm, residual_rms_norm_reference
from pallas_kernels.sparse_matvec import (
    accumulator_shape,
    sparse_input_matvec,
    sparse_input_matvec_into,
    sparse_input_matvec_reference,
    sparse_input_matvecs_into,
)

__all__ = [
    "IMPLS",
    "RmsNormOut",
    "accumulator_shape",
    "compact_rows",
    "compact_rows_reference",
    "compacted_input_matvec",
    "compacted_matvec_into",
    "gated_matvec",
    "gated_matvec_reference",
    "head_mask_from_indices",
    "head_sparse_attention",
    "head_sparse_attention_from_qkv",
    "head_sparse_attention_reference",
    "residual_rms_norm",
    "residual_rms_norm_reference",
    "sparse_input_matvec",
    "sparse_input_matvec_into",
    "sparse_input_matvec_reference",
    "sparse_input_matvecs_into",
]
