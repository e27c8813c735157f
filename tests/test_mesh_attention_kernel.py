"""The decode attention kernel (`Kernels.decode_attention`, the GPU default) on a mesh:
run per shard (each device its rows and its kv heads) with the `o_in` threshold split
the same way, it gives one device's greedy tokens and measured sparsity. On 2 fake CPU
devices (`--xla_force_host_platform_device_count=2`, set in a subprocess before jax
starts), with the kernel in the GPU interpreter, for `model=2` and `data=2` and for an
XLA step (batch 2, where the kernel applies `o_in`) and a pallas one (o_proj's kernel
applies it)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest


def run_cases() -> dict:
    import dataclasses

    import jax
    import jax.numpy as jnp
    from tiny import LLAMA, random_thresholds

    from jaxsparse.generate import Generator
    from jaxsparse.models import init_params
    from jaxsparse.registry import kernels_for_method

    assert len(jax.devices()) == 2, jax.devices()
    config = dataclasses.replace(LLAMA, vocab_size=128, intermediate_size=64, head_dim=16)
    params = jax.tree.map(lambda x: x * 10, init_params(config, seed=3))
    thresholds = random_thresholds(config, jax.random.key(5))
    for layer in thresholds.values():  # o_in thresholds that zero about half the outputs
        layer["o_in"] = jnp.full((config.q_dim,), 8.0)
    prompts = {1: [[5, 6, 7, 8]], 2: [[5, 6, 7, 8], [9, 10]]}
    out = {}
    for mode, batch in (("xla", 2), ("pallas", 1)):
        kernels = kernels_for_method("teal", mode, "gpu_interpret", thresholds=thresholds)
        assert kernels.decode_attention
        for mesh in (None, "model=2", "data=2"):
            if mesh == "data=2" and batch == 1:
                continue
            gen = Generator(config, params, kernels=kernels, mesh=mesh)
            g = gen.generate_ids(prompts[batch], 5, thresholds=thresholds, stop_at_eos=False)
            out[f"{mode}/{mesh}"] = {
                "tokens": g.tokens,
                "sparsity": g.measured_sparsity,
                # the model's kernels get the mesh, so the kernel runs per shard
                "kernels_mesh": None if gen.kernels.mesh is None else dict(gen.kernels.mesh.shape),
            }
        plain = dataclasses.replace(kernels, decode_attention=False)
        g = Generator(config, params, kernels=plain).generate_ids(
            prompts[batch], 5, thresholds=thresholds, stop_at_eos=False
        )
        out[f"{mode}/xla_attention"] = {"tokens": g.tokens, "sparsity": g.measured_sparsity}
    # chess's kernels have no o_in point: in a pallas step the attention kernel applies
    # o_in itself, per shard
    kernels = kernels_for_method("chess", "pallas", "gpu_interpret", thresholds=thresholds)
    for mesh in (None, "model=2"):
        g = Generator(config, params, kernels=kernels, mesh=mesh).generate_ids(
            prompts[1], 5, thresholds=thresholds, stop_at_eos=False
        )
        out[f"chess/{mesh}"] = {"tokens": g.tokens, "sparsity": g.measured_sparsity}
    return out


@pytest.fixture(scope="module")
def report() -> dict:
    from tiny import fake_devices_report

    return fake_devices_report(__file__, 2)


@pytest.mark.parametrize(
    "case",
    [
        "xla/model=2",
        "xla/data=2",
        "xla/xla_attention",
        "pallas/model=2",
        "pallas/xla_attention",
        "chess/model=2",
    ],
)
def test_a_mesh_gives_the_single_device_tokens_and_sparsity(report, case):
    mode = case.split("/")[0]
    want, got = report[f"{mode}/None"], report[case]
    assert got["tokens"] == want["tokens"]
    assert set(got["sparsity"]) == set(want["sparsity"])
    for point, value in want["sparsity"].items():
        assert got["sparsity"][point] == pytest.approx(value, abs=1e-6), point
    assert 0.2 < want["sparsity"]["o_in"] < 0.9  # the threshold does zero some outputs


def test_the_kernels_get_the_mesh_in_xla_steps_too(report):
    """An XLA step's attention kernel on whole arrays would have XLA gather every device's
    KV cache onto each device (a custom call is not partitioned); so the Generator gives
    the mesh to the model's kernels in XLA mode too, as it does in pallas mode."""
    for mode in ("xla", "pallas"):
        assert report[f"{mode}/None"]["kernels_mesh"] is None
        assert report[f"{mode}/model=2"]["kernels_mesh"] == {"data": 1, "model": 2}
    assert report["xla/data=2"]["kernels_mesh"] == {"data": 2, "model": 1}


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    print(json.dumps(run_cases()))
