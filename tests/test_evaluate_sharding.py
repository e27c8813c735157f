"""The logical-axis rules: each params axis maps to the mesh axis the table names."""

from __future__ import annotations

import jax
from jax.sharding import AbstractMesh, PartitionSpec

from jaxsparse.config import ModelConfig
from jaxsparse.models import init_params, logical_axes
from jaxsparse.sharding import (
    LOGICAL_AXIS_RULES,
    logical_to_mesh,
    make_mesh,
    put_batch,
    round_batch,
    shard_params,
)

TINY = ModelConfig(model_type="llama", vocab_size=260, hidden_size=32, intermediate_size=48,
                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)


def test_every_logical_axis_of_the_models_has_a_rule():
    names = {n for spec in jax.tree.leaves(logical_axes(TINY),
                                           is_leaf=lambda x: isinstance(x, PartitionSpec))
             for n in spec if n is not None}
    assert names <= dict(LOGICAL_AXIS_RULES).keys()


def test_logical_to_mesh_follows_the_table():
    mesh = AbstractMesh((2, 4), ("data", "model"))
    assert logical_to_mesh(PartitionSpec("embed", "mlp"), mesh) == PartitionSpec(None, "model")
    assert logical_to_mesh(PartitionSpec("vocab", "embed"), mesh) == PartitionSpec("model", None)
    # a mesh axis is used once per array
    assert logical_to_mesh(PartitionSpec("q_heads", "mlp"), mesh) == PartitionSpec("model", None)
    # a size-1 model axis replicates
    one = AbstractMesh((2, 1), ("data", "model"))
    assert logical_to_mesh(PartitionSpec("embed", "mlp"), one) == PartitionSpec(None, None)


def test_single_device_placement_is_a_no_op():
    mesh = make_mesh()
    assert mesh.shape["data"] == len(jax.local_devices())
    params = init_params(TINY)
    placed = shard_params(params, TINY, mesh)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(placed)):
        assert (a == b).all()
    assert round_batch(3, mesh) % mesh.shape["data"] == 0
    assert put_batch(jax.numpy.zeros((4, 3)), mesh).shape == (4, 3)
