"""Device meshes and the logical-axis rules that place params and batches on them.

As in maxtext: the params carry logical axis names (`jaxsparse.models.logical_axes`),
and one table, `LOGICAL_AXIS_RULES`, maps each logical name to a mesh axis (or to None:
replicated). Changing how a model is spread over devices is then a change of the table or
of the mesh shape, not of the model code.

The mesh has two axes: `data` (batch rows; data parallelism) and `model` (tensor
parallelism of the heads, the FFN channels and the vocabulary). `make_mesh()` puts every
local device on `data`, so evaluation and calibration are data parallel; with one device
(a CPU) everything is a no-op placement. It holds no model code.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA, MODEL = "data", "model"

# logical axis name (see jaxsparse/models) -> mesh axis, or None to replicate.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | None], ...] = (
    ("vocab", MODEL),
    ("embed", None),
    ("q_heads", MODEL),
    ("kv_heads", MODEL),
    ("mlp", MODEL),
    ("norm", None),
    ("positions", None),
    ("embed_proj", None),
)


def make_mesh(data: int | None = None, model: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (`data`, `model`) mesh; `data=None` uses every remaining local device."""
    devices = list(devices if devices is not None else jax.local_devices())
    if model < 1 or len(devices) % model:
        raise ValueError(f"model={model} does not divide the {len(devices)} devices")
    if data is None:
        data = len(devices) // model
    if data * model > len(devices):
        raise ValueError(f"mesh {data}x{model} needs {data * model} devices; "
                         f"{len(devices)} available")
    grid = np.asarray(devices[: data * model], dtype=object).reshape(data, model)
    return Mesh(grid, (DATA, MODEL))


def logical_to_mesh(spec: PartitionSpec | Sequence[str | None] | None, mesh: Mesh,
                    rules: Sequence[tuple[str, str | None]] = LOGICAL_AXIS_RULES
                    ) -> PartitionSpec:
    """Maps a PartitionSpec of logical names to one of mesh axes.

    A mesh axis of size 1, or one already used by an earlier dimension, is dropped
    (replicated), so one table serves every mesh shape.
    """
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in tuple(spec or ()):
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no rule in LOGICAL_AXIS_RULES")
        axis = table[name]
        if axis is None or axis in used or mesh.shape.get(axis, 1) == 1:
            out.append(None)
        else:
            out.append(axis)
            used.add(axis)
    return PartitionSpec(*out)


def param_shardings(config, mesh: Mesh,
                    rules: Sequence[tuple[str, str | None]] = LOGICAL_AXIS_RULES) -> dict:
    """The params tree of NamedShardings for `config` on `mesh`."""
    from jaxsparse.models import logical_axes

    specs = logical_axes(config)
    return jax.tree.map(lambda s: NamedSharding(mesh, logical_to_mesh(s, mesh, rules)), specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None)


def shard_params(params: dict, config, mesh: Mesh,
                 rules: Sequence[tuple[str, str | None]] = LOGICAL_AXIS_RULES) -> dict:
    """Places `params` on `mesh` following the logical-axis rules."""
    return jax.device_put(params, param_shardings(config, mesh, rules))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows of a batch over `data`, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape[DATA]


def round_batch(batch_size: int, mesh: Mesh) -> int:
    """`batch_size` rounded up to a multiple of the data-parallel size."""
    n = data_parallel_size(mesh)
    return -(-batch_size // n) * n


def put_batch(x: np.ndarray, mesh: Mesh):
    """A host batch [B, ...] onto the mesh, rows split over `data` (B must divide)."""
    n = data_parallel_size(mesh)
    if x.ndim == 0 or x.shape[0] % n:
        return jax.device_put(x, replicated(mesh))
    return jax.device_put(x, batch_sharding(mesh))
