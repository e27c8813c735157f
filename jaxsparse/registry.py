"""What a sparsity method's name means at inference: which points its decode steps run
through the sparse kernels, whether its q and k/v share one input, and the kernel setup
that follows (`kernels_for_method`). The masks themselves (`jaxsparse.rules`) and the
model (`jaxsparse.models`) know no method names."""

from __future__ import annotations

from jaxsparse.models.layers import Kernels

# Per method, the points whose projections a decode step runs through the sparse kernels
# (`jaxsparse.models.Kernels`): where the method makes zeros. Zeroing the gate (CATS,
# CHESS) zeroes the down input too.
KERNEL_POINTS: dict[str, tuple[str, ...]] = {
    "dense": (),
    "cats": ("gate", "down_in"),
    "chess": ("gate", "down_in"),
    # kv_in is dense here (threshold 0), but XLA reads a [d, 2 kv] matvec at a third of
    # the bandwidth the kernel reaches (H100 profile), so k/v go through it too.
    "chess+": ("q_in", "kv_in", "o_in", "gate", "down_in"),
    "teal": ("q_in", "kv_in", "o_in", "ffn_in", "down_in"),
    # WINA: TEAL's points, per-channel thresholds `T / n_i` (docs/methods.md).
    "wina": ("q_in", "kv_in", "o_in", "ffn_in", "down_in"),
    # Learned thresholds zero what the closed-form method they start from zeroes.
    "chess-learned": ("gate", "down_in"),
    "teal-learned": ("q_in", "kv_in", "o_in", "ffn_in", "down_in"),
    # End-to-end learned (`jaxsparse learn-kl`): any of the points.
    "kl-learned": ("q_in", "kv_in", "o_in", "ffn_in", "gate", "down_in"),
    # Deja Vu: predicted FFN neurons zero the gate; predicted heads zero o_proj's input
    # (q/k/v stay dense here: see docs/learned.md).
    "dejavu": ("o_in", "gate", "down_in"),
}

# Per method, points the method leaves dense whose projections a decode step still runs
# through `sparse_input_matvec` (`Kernels.dense_points`), which then reads every row:
# - the gate of CATS/CHESS. In XLA it is a GEMM fused with the activation and threshold
#   that took 42.7 us per layer in an H200 decode step (2.75 TB/s), the kernel 32.2 us;
# - Deja Vu's k|v (every kv head is computed): XLA turned that [d, 2 kv] matvec into a
#   float32 product written out whole and a column sum, 24 us per layer on an H200
#   (benchmarks/results/dejavu_topk_h200.json; benchmarks/NOTES_kernels.md).
DENSE_KERNEL_POINTS: dict[str, tuple[str, ...]] = {
    **{m: ("ffn_in",) for m in ("cats", "chess", "chess+", "chess-learned")},
    "dejavu": ("kv_in",),
}

# Methods whose q and k/v inputs always carry the same threshold (or none), so that q/k/v
# can run as one fused matmul; the others (chess+, teal-learned) fuse only k and v.
SHARED_QKV_INPUT = frozenset({"dense", "cats", "chess", "chess-learned", "teal", "wina", "dejavu"})


# From this target sparsity on, a state's sparse-input matvecs read a list of their active
# rows (`Kernels.compact_points`). On an H200 (Llama-3-8B's 4096x14336 and 14336x4096,
# bf16, batch 1; benchmarks/results/compacted_rows_h200/compacted_matvec*.json) the list
# and its matvec took 21.4-21.7 us at 50% against 20.1-20.8 for the masked tiles,
# 18.4-19.2 against 18.3-18.8 at 60%, and 15.7-15.8 against 17.0-17.3 at 70%: the
# crossover lies between 60% and 70%.
COMPACT_FROM_SPARSITY = 0.65


def kernels_for_method(
    method: str,
    mode: str = "pallas",
    impl: str = "auto",
    thresholds: dict | None = None,
    sparsity: float | None = None,
) -> Kernels:
    """The kernel setup for a sparsity method's decode steps (`KERNEL_POINTS`).

    `thresholds`, the `thresholds=` tree of the state that will run: q/k/v are fused into
    one matmul on the q input only when its `q_in` and `kv_in` thresholds are equal in
    every layer (`jaxsparse.sparsity.shares_qkv_input`); otherwise k/v run apart, on their
    own input, so that the `kv_in` threshold is the one applied. None: decided by the
    method's name alone (`SHARED_QKV_INPUT`). `sparsity`, the state's target sparsity:
    from `COMPACT_FROM_SPARSITY` on, each of the method's points but "gate" (whose up
    projection `gated_matvec` runs) reads a list of its active rows
    (`Kernels.compact_points`); None: never."""
    from jaxsparse.sparsity import shares_qkv_input

    if method not in KERNEL_POINTS:
        raise ValueError(f"no kernel path for method {method!r}; known: {sorted(KERNEL_POINTS)}")
    # else q has a threshold of its own (chess+, or a state whose q_in and kv_in differ)
    fuse = method in SHARED_QKV_INPUT and shares_qkv_input(thresholds)
    if mode == "xla":
        return Kernels("xla", fuse_qkv=fuse, fuse_kv=not fuse)
    heads = method == "dejavu"  # head-sparse attention: q apart from k/v (`Kernels.q_rows`)
    points = KERNEL_POINTS[method]
    return Kernels(
        mode,
        fuse_qkv=fuse and not heads,
        fuse_kv=not fuse or heads,
        # gate and up both read the thresholded FFN input: one launch (`Kernels.fuse_gate_up`)
        fuse_gate_up="ffn_in" in points and "gate" not in points and not heads,
        points=points,
        dense_points=DENSE_KERNEL_POINTS.get(method, ()),
        impl=impl,
        gate_proj_rows=method == "dejavu",
        head_attention=heads,
        compact_points=tuple(p for p in points if p != "gate")
        if sparsity is not None and sparsity >= COMPACT_FROM_SPARSITY
        else (),
    )
