"""The logical-axis rules: each params axis maps to the mesh axis the table names, for
every params layout (fused q/k/v, rows layouts of the kernels), the KV cache and the
sparsity states; `--mesh` specs. Results on several (fake CPU) devices:
tests/test_mesh.py."""

from __future__ import annotations

import jax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec
from tiny import LLAMA

from jaxsparse.models import (
    cache_logical_axes,
    init_params,
    logical_axes,
    prepare_params,
    state_logical_axes,
)
from jaxsparse.models.layers import XLA
from jaxsparse.registry import KERNEL_POINTS, kernels_for_method
from jaxsparse.sharding import (
    LOGICAL_AXIS_RULES,
    logical_to_mesh,
    make_mesh,
    mesh_from_spec,
    parse_mesh,
    put_batch,
    round_batch,
    shard_params,
)

TINY = LLAMA.replace(eos_token_ids=())


def _names(tree) -> set[str]:
    return {
        n
        for spec in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, PartitionSpec))
        for n in spec
        if n is not None
    }


# every distinct params layout (methods share most of them)
LAYOUTS = list(
    {
        (k.fuse_qkv, k.fuse_kv, k.up_rows, k.gate_rows, k.q_rows): k
        for k in [XLA]
        + [kernels_for_method(m, mode) for m in sorted(KERNEL_POINTS) for mode in ("xla", "pallas")]
    }.values()
)


@pytest.mark.parametrize(
    "kernels",
    LAYOUTS,
    ids=lambda k: (
        f"qkv{k.fuse_qkv:d}-kv{k.fuse_kv:d}-up{k.up_rows:d}-gate{k.gate_rows:d}-q{k.q_rows:d}"
    ),
)
def test_every_logical_axis_of_every_layout_has_a_rule(kernels):
    """The params `prepare_params` lays out for any kernel setup: their logical axes (the
    tree matches the params) all have a rule, and the fused q/k/v outputs are split."""
    specs = logical_axes(TINY, kernels)
    params = prepare_params(init_params(TINY), TINY, kernels)
    assert jax.tree.structure(params) == jax.tree.structure(
        specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )
    assert _names(specs) <= dict(LOGICAL_AXIS_RULES).keys()
    attn = specs["layers_0"]["self_attn"]
    mesh = AbstractMesh((1, 2), ("data", "model"))
    for name in ("qkv_proj", "kv_proj"):
        if name in attn:
            assert logical_to_mesh(attn[name]["kernel"], mesh) == PartitionSpec(None, "model")


def test_cache_and_state_axes_have_rules():
    from jaxsparse.sparsity import dense_state

    assert _names(cache_logical_axes(TINY)) <= dict(LOGICAL_AXIS_RULES).keys()
    tree = dense_state(TINY).thresholds_for_model()
    axes = state_logical_axes(tree)
    assert _names(axes) <= dict(LOGICAL_AXIS_RULES).keys()
    assert axes["layers_1"]["gate"] == PartitionSpec("mlp")
    assert axes["layers_1"]["o_in"] == PartitionSpec("q_heads")


def test_sharding_does_not_import_the_models():
    """Layering: sharding sits below the models (it takes their axis names as arguments)."""
    import subprocess
    import sys

    code = (
        "import sys, jaxsparse.sharding; "
        "assert not any(m.startswith('jaxsparse.models') for m in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_dimension_the_mesh_axis_does_not_divide_is_replicated():
    mesh = AbstractMesh((1, 2), ("data", "model"))
    assert logical_to_mesh(PartitionSpec("embed", "kv_heads"), mesh, shape=(8, 6)) == PartitionSpec(
        None, "model"
    )
    assert logical_to_mesh(PartitionSpec("embed", "kv_heads"), mesh, shape=(8, 3)) == PartitionSpec(
        None, None
    )


def test_fused_kv_columns_hold_whole_heads():
    """kv_proj's and qkv_proj's columns are grouped per kv head, so an even split over
    `model` gives each device the k and the v of its own heads."""
    params = init_params(TINY, seed=2)
    for method, name, per_head in (("chess+", "kv_proj", 2), ("dense", "qkv_proj", 4)):
        fused = prepare_params(params, TINY, kernels_for_method(method, "xla"))
        attn = params["layers_0"]["self_attn"]
        w = fused["layers_0"]["self_attn"][name]["kernel"]  # [d, Hkv * per_head * Dh]
        half = w.shape[1] // 2  # device 0's columns on model=2: kv head 0
        dh = TINY.head_dim
        k0 = attn["k_proj"]["kernel"][:, :dh]
        v0 = attn["v_proj"]["kernel"][:, :dh]
        assert (w[:, half - 2 * dh : half - dh] == k0).all()
        assert (w[:, half - dh : half] == v0).all()


@pytest.mark.parametrize(
    "text,want",
    [
        ("data=4,model=2", {"data": 4, "model": 2}),
        ("model=8", {"data": 1, "model": 8}),
        (" data = 2 ", {"data": 2, "model": 1}),
    ],
)
def test_parse_mesh(text, want):
    assert parse_mesh(text) == want


@pytest.mark.parametrize(
    "text,message",
    [
        ("", "empty mesh"),
        ("data=2;model=2", "is not"),
        ("data=2,data=2", "data given twice"),
        ("data=0", "data=0: must be >= 1"),
        ("pipe=2", "is not data=N"),
        ("data=x", "is not"),
    ],
)
def test_parse_mesh_refuses(text, message):
    with pytest.raises(ValueError, match=message):
        parse_mesh(text)


def test_mesh_must_use_every_device():
    n = len(jax.devices())
    with pytest.raises(ValueError, match=f"make data x model = {n}"):
        mesh_from_spec(f"data={n + 1}")
    assert mesh_from_spec(f"data={n}").shape == {"data": n, "model": 1}


def test_logical_to_mesh_follows_the_table():
    mesh = AbstractMesh((2, 4), ("data", "model"))
    assert logical_to_mesh(PartitionSpec("embed", "mlp"), mesh) == PartitionSpec(None, "model")
    # the vocabulary is not split (a decode step's argmax would gather it: tests/test_mesh.py)
    assert logical_to_mesh(PartitionSpec("vocab", "embed"), mesh) == PartitionSpec(None, None)
    # a mesh axis is used once per array
    assert logical_to_mesh(PartitionSpec("q_heads", "mlp"), mesh) == PartitionSpec("model", None)
    # a size-1 model axis replicates
    one = AbstractMesh((2, 1), ("data", "model"))
    assert logical_to_mesh(PartitionSpec("embed", "mlp"), one) == PartitionSpec(None, None)


def test_single_device_placement_is_a_no_op():
    mesh = make_mesh()
    assert mesh.shape["data"] == len(jax.local_devices())
    params = init_params(TINY)
    placed = shard_params(params, logical_axes(TINY), mesh)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(placed)):
        assert (a == b).all()
    assert round_batch(3, mesh) % mesh.shape["data"] == 0
    assert put_batch(jax.numpy.zeros((4, 3)), mesh).shape == (4, 3)
