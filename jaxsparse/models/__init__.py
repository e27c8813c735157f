"""Model families and the helpers to build, initialize and shape-check them."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsparse.config import ModelConfig
from jaxsparse.models.layers import init_cache, positions_from_mask
from jaxsparse.models.llama import LlamaForCausalLM
from jaxsparse.models.opt import OPTForCausalLM

__all__ = [
    "LlamaForCausalLM", "OPTForCausalLM", "build_model", "init_params", "param_shapes",
    "logical_axes", "init_cache", "positions_from_mask",
]


def build_model(config: ModelConfig) -> nn.Module:
    return OPTForCausalLM(config) if config.family == "opt" else LlamaForCausalLM(config)


def _init(config: ModelConfig, rng):
    model = build_model(config)
    tokens = jnp.zeros((1, 2), jnp.int32)
    return model.init(rng, tokens, jnp.arange(2)[None])["params"]


def init_params(config: ModelConfig, seed: int = 0) -> dict:
    """Random params (normal, std 0.02), for tests and benchmarks."""
    return nn.unbox(_init(config, jax.random.key(seed)))


def param_shapes(config: ModelConfig) -> dict:
    """The params tree as `jax.ShapeDtypeStruct`s, without allocating anything."""
    return nn.unbox(jax.eval_shape(lambda: _init(config, jax.random.key(0))))


def logical_axes(config: ModelConfig) -> dict:
    """The params tree with each leaf replaced by its logical axis names (a PartitionSpec)."""
    boxed = jax.eval_shape(lambda: _init(config, jax.random.key(0)))
    return nn.get_partition_spec(boxed)
