"""Device meshes and the logical-axis rules that place params, caches, sparsity states and
batches on them.

As in maxtext: each array carries logical axis names (the params' come from
`jaxsparse.models.logical_axes`, the KV cache's from `jaxsparse.models.cache_logical_axes`,
a sparsity state's from `jaxsparse.models.state_logical_axes`), and one table,
`LOGICAL_AXIS_RULES`, maps each logical name to a mesh axis (or to None: replicated).
Changing how a model is spread over devices is then a change of the table or of the mesh
shape, not of the model code. This module takes those name trees as arguments: it sits
below the models and imports none of them.

The mesh has two axes: `data` (batch rows; data parallelism) and `model` (tensor
parallelism of the heads and the FFN channels; the embedding and LM head stay whole).
`make_mesh()` puts every local device on `data`, so evaluation and calibration are data
parallel by default; `make_mesh(data, model)` (or `parse_mesh("data=4,model=2")`, the
CLI's `--mesh`) any other shape. With one device (a CPU) everything is a no-op placement.

A dimension is split over a mesh axis only when the axis size divides it; otherwise it is
replicated (a model with 3 kv heads on `model=2` keeps its k/v projections whole).
Sharding never changes what is computed, only where: XLA inserts the communication.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA, MODEL = "data", "model"

# logical axis name -> mesh axis, or None to replicate. The names are those of
# `jaxsparse.models` (params, KV cache) and `jaxsparse.rules` (sparsity states).
LOGICAL_AXIS_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", DATA),  # rows of a batch, of the KV cache and of the decode loop's state
    # The vocabulary stays whole on every device: split over `model`, each decode step's
    # argmax over the split logits cost two all-gathers, ~1 ms each on two H200s, and made
    # `model=2` decoding slower than one GPU (150 against 183 tokens/s for Llama-3-8B
    # shapes; whole: 208, benchmarks/results/multi_gpu_h200x2_replicated_vocab.json).
    ("vocab", None),
    ("embed", None),
    ("q_heads", MODEL),  # q_proj's output, o_proj's input: num_heads * head_dim
    ("kv_heads", MODEL),  # k/v_proj's output, kv_proj's (k and v of a head side by side)
    ("qkv_heads", MODEL),  # qkv_proj's output, grouped per kv head (q..., k, v)
    ("heads", MODEL),  # one entry per attention head (Deja Vu head predictor)
    ("mlp", MODEL),
    ("norm", None),
    ("head_dim", None),
    ("positions", None),
    ("embed_proj", None),
    ("rank", None),  # Deja Vu predictors' low-rank axis
)


def make_mesh(
    data: int | None = None, model: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A (`data`, `model`) mesh; `data=None` uses every remaining local device."""
    devices = list(devices if devices is not None else jax.local_devices())
    if model < 1 or len(devices) % model:
        raise ValueError(f"model={model} does not divide the {len(devices)} devices")
    if data is None:
        data = len(devices) // model
    if data < 1:
        raise ValueError(f"data={data}: must be >= 1")
    if data * model > len(devices):
        raise ValueError(
            f"mesh {data}x{model} needs {data * model} devices; {len(devices)} available"
        )
    grid = np.asarray(devices[: data * model], dtype=object).reshape(data, model)
    return Mesh(grid, (DATA, MODEL))


_MESH_ITEM = re.compile(r"^\s*(data|model)\s*=\s*([0-9]+)\s*$")


def parse_mesh(text: str) -> dict[str, int]:
    """`"data=N,model=M"` -> `{"data": N, "model": M}`; an axis left out is 1. Raises
    ValueError (naming the mistake) for anything else."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("empty mesh: write data=N,model=M")
    out: dict[str, int] = {}
    for item in text.split(","):
        m = _MESH_ITEM.match(item)
        if m is None:
            raise ValueError(f"{item.strip()!r} is not data=N or model=M (e.g. data=4,model=2)")
        axis, size = m.group(1), int(m.group(2))
        if axis in out:
            raise ValueError(f"{axis} given twice")
        if size < 1:
            raise ValueError(f"{axis}={size}: must be >= 1")
        out[axis] = size
    return {DATA: out.get(DATA, 1), MODEL: out.get(MODEL, 1)}


def mesh_from_spec(spec: str | dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The mesh of a `parse_mesh` string or dict over every device (`jax.devices()`):
    data x model must equal their number. Raises ValueError with the fix otherwise."""
    shape = parse_mesh(spec) if isinstance(spec, str) else {DATA: 1, MODEL: 1, **spec}
    devices = list(devices if devices is not None else jax.devices())
    n = shape[DATA] * shape[MODEL]
    if n != len(devices):
        raise ValueError(
            f"data={shape[DATA]} x model={shape[MODEL]} = {n} devices, but {len(devices)} "
            f"are visible: make data x model = {len(devices)} (e.g. data={len(devices)} or "
            f"data={max(1, len(devices) // shape[MODEL])},model={shape[MODEL]}), or make "
            f"only {n} visible (CUDA_VISIBLE_DEVICES)"
        )
    return make_mesh(shape[DATA], shape[MODEL], devices)


def as_mesh(mesh: Mesh | str | dict | None) -> Mesh:
    """`mesh` as a Mesh: a Mesh itself, a `parse_mesh` spec, or None (`make_mesh()`)."""
    if mesh is None:
        return make_mesh()
    if isinstance(mesh, Mesh):
        return mesh
    return mesh_from_spec(mesh)


def logical_to_mesh(
    spec: PartitionSpec | Sequence[str | None] | None,
    mesh: Mesh,
    rules: Sequence[tuple[str, str | None]] = LOGICAL_AXIS_RULES,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """Maps a PartitionSpec of logical names to one of mesh axes.

    A mesh axis of size 1, one already used by an earlier dimension, or (given `shape`)
    one whose size does not divide the dimension, is dropped (replicated), so one table
    serves every mesh shape and model.
    """
    table = dict(rules)
    used: set[str] = set()
    out = []
    for i, name in enumerate(tuple(spec or ())):
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no rule in LOGICAL_AXIS_RULES")
        axis = table[name]
        size = mesh.shape.get(axis, 1) if axis is not None else 1
        if axis is None or axis in used or size == 1 or (shape is not None and shape[i] % size):
            out.append(None)
        else:
            out.append(axis)
            used.add(axis)
    return PartitionSpec(*out)


def _is_spec(x) -> bool:
    return isinstance(x, PartitionSpec) or x is None


def tree_shardings(
    logical: Any,
    shapes: Any,
    mesh: Mesh,
    rules: Sequence[tuple[str, str | None]] = LOGICAL_AXIS_RULES,
) -> Any:
    """NamedShardings for a tree of arrays (or anything with `.shape`) from the matching
    tree of logical PartitionSpecs (None: replicated)."""
    return jax.tree.map(
        lambda s, a: NamedSharding(mesh, logical_to_mesh(s, mesh, rules, np.shape(a))),
        logical,
        shapes,
        is_leaf=_is_spec,
    )


def shard_tree(
    tree: Any,
    logical: Any,
    mesh: Mesh,
    rules: Sequence[tuple[str, str | None]] = LOGICAL_AXIS_RULES,
) -> Any:
    """Places `tree` on `mesh` following its logical axis names and the rules."""
    return jax.device_put(tree, tree_shardings(logical, tree, mesh, rules))


def param_shardings(
    logical: dict,
    shapes: dict,
    mesh: Mesh,
    rules: Sequence[tuple[str, str | None]] = LOGICAL_AXIS_RULES,
) -> dict:
    """The params tree of NamedShardings, from the params' logical axes
    (`jaxsparse.models.logical_axes(config, kernels)`) and their shapes."""
    return tree_shardings(logical, shapes, mesh, rules)


def shard_params(
    params: dict,
    logical: dict,
    mesh: Mesh,
    rules: Sequence[tuple[str, str | None]] = LOGICAL_AXIS_RULES,
) -> dict:
    """Places `params` on `mesh` following the logical-axis rules; `logical` is the tree
    `jaxsparse.models.logical_axes(config, kernels)` gives for these params' layout."""
    return shard_tree(params, logical, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows of a batch over `data`, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape[DATA]


def model_parallel_size(mesh: Mesh | None) -> int:
    return 1 if mesh is None else mesh.shape[MODEL]


def round_batch(batch_size: int, mesh: Mesh) -> int:
    """`batch_size` rounded up to a multiple of the data-parallel size."""
    n = data_parallel_size(mesh)
    return -(-batch_size // n) * n


def rows_per_batch(num_rows: int, batch_size: int, mesh: Mesh | None = None) -> int:
    """Rows per batch for `num_rows` rows at most `batch_size` a batch: `batch_size`, or,
    when all rows fit in fewer, the next power of two (a few shapes to compile, not one per
    row count), rounded up to the data-parallel size of `mesh`. Padding rows would be
    computed and thrown away: 2 rows of text in a batch of 8 cost 4 times the work."""
    rows = 1 << max(0, num_rows - 1).bit_length()
    if mesh is not None:
        rows = round_batch(rows, mesh)
    return max(1, min(batch_size, rows))


def put_batch(x: np.ndarray, mesh: Mesh):
    """A host batch [B, ...] onto the mesh, rows split over `data` (replicated if the
    data-parallel size does not divide B)."""
    n = data_parallel_size(mesh)
    if np.ndim(x) == 0 or np.shape(x)[0] % n:
        return jax.device_put(x, replicated(mesh))
    return jax.device_put(x, batch_sharding(mesh))


def describe(mesh: Mesh) -> dict[str, int]:
    """`{"data": N, "model": M}` for results files."""
    return {DATA: int(mesh.shape[DATA]), MODEL: int(mesh.shape[MODEL])}
