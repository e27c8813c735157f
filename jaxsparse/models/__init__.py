"""Model families and the helpers to build, initialize and shape-check them."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsparse.config import ModelConfig
from jaxsparse.models.layers import XLA, Kernels, init_cache, positions_from_mask
from jaxsparse.models.llama import LlamaForCausalLM
from jaxsparse.models.opt import OPTForCausalLM

__all__ = [
    "Kernels",
    "LlamaForCausalLM",
    "OPTForCausalLM",
    "build_model",
    "cache_logical_axes",
    "init_cache",
    "init_params",
    "logical_axes",
    "param_shapes",
    "positions_from_mask",
    "prepare_params",
    "state_logical_axes",
]


def build_model(config: ModelConfig, kernels: Kernels = XLA) -> nn.Module:
    """The Flax module of `config`'s family; `kernels` picks the decode matmul path."""
    cls = OPTForCausalLM if config.family == "opt" else LlamaForCausalLM
    return cls(config, kernels)


def prepare_params(params: dict, config: ModelConfig, kernels: Kernels) -> dict:
    """Lays weights out for `kernels`, once at load time: with the gate kernel, every
    `up_proj` kernel becomes `[m, d]` so that the rows an active gate needs are contiguous
    (and `gate_proj` too with `gate_proj_rows`: Deja Vu); with `fuse_gate_up`, gate/up_proj
    become one `gate_up_proj` (kernel `[d, 2m]`, columns interleaved gate_i, up_i);
    with `fuse_qkv`, q/k/v_proj become one `qkv_proj` (kernel `[d, q + 2 kv]`); with
    `fuse_kv`, k/v_proj become one `kv_proj` (`[d, 2 kv]`); with `q_rows` (Deja Vu heads),
    `q_proj` becomes `[q, d]`.
    The fused output columns are grouped per kv head, `[Hkv, G + 2, Dh]` (the G = H / Hkv
    q heads that share kv head h, then its k, then its v; `[Hkv, 2, Dh]` for `kv_proj`),
    so that splitting them into equal parts over devices (`jaxsparse.sharding`) gives each
    device whole heads with their own k and v, not k on one device and v on another.
    Returns a new tree (shares the untouched arrays)."""
    up_rows = kernels.up_rows and config.family == "llama"
    gate_rows = kernels.gate_rows and config.family == "llama"
    gate_up = kernels.fuse_gate_up and config.family == "llama"
    if not (up_rows or gate_up or kernels.fuse_qkv or kernels.fuse_kv):
        return params
    out = dict(params)
    for i in range(config.num_layers):
        layer = dict(out[f"layers_{i}"])
        if gate_up:  # [d, m] + [d, m] -> [d, 2m], columns (gate_i, up_i)
            mlp = dict(layer["mlp"])
            g, u = mlp.pop("gate_proj"), mlp.pop("up_proj")
            mlp["gate_up_proj"] = {
                name: jnp.stack([jnp.asarray(g[name]), jnp.asarray(u[name])], axis=-1).reshape(
                    *g[name].shape[:-1], -1
                )
                for name in g
            }
            layer["mlp"] = mlp
        if up_rows:
            mlp = dict(layer["mlp"])
            mlp["up_proj"] = {**mlp["up_proj"], "kernel": jnp.asarray(mlp["up_proj"]["kernel"]).T}
            if gate_rows:
                mlp["gate_proj"] = {
                    **mlp["gate_proj"],
                    "kernel": jnp.asarray(mlp["gate_proj"]["kernel"]).T,
                }
            layer["mlp"] = mlp
        if kernels.fuse_qkv or kernels.fuse_kv:
            attn = dict(layer["self_attn"])
            names = ("q_proj", "k_proj", "v_proj") if kernels.fuse_qkv else ("k_proj", "v_proj")
            parts = [attn.pop(n) for n in names]
            attn["qkv_proj" if kernels.fuse_qkv else "kv_proj"] = {
                name: _group_by_kv_head([jnp.asarray(p[name]) for p in parts], config)
                for name in parts[0]
            }
            if kernels.q_rows:  # Deja Vu heads: a head's q weights are contiguous rows
                attn["q_proj"] = {
                    **attn["q_proj"],
                    "kernel": jnp.asarray(attn["q_proj"]["kernel"]).T,
                }
            layer["self_attn"] = attn
        out[f"layers_{i}"] = layer
    return out


def _group_by_kv_head(parts: list[jax.Array], config: ModelConfig) -> jax.Array:
    """Concatenates q (optional), k and v weights (or biases) along their output axis,
    grouped per kv head: `[..., Hkv * (G + 2) * Dh]` from `[..., G * Hkv * Dh]` (q) and
    `[..., Hkv * Dh]` (k, v). `jaxsparse.models.attention` splits it back."""
    kv, dh = config.num_kv_heads, config.head_dim
    grouped = [p.reshape(*p.shape[:-1], kv, -1, dh) for p in parts]
    out = jnp.concatenate(grouped, axis=-2)
    return out.reshape(*out.shape[:-3], -1)


def _init(config: ModelConfig, rng, kernels: Kernels = XLA):
    model = build_model(config, kernels)
    tokens = jnp.zeros((1, 2), jnp.int32)
    return model.init(rng, tokens, jnp.arange(2)[None])["params"]


def init_params(config: ModelConfig, seed: int = 0) -> dict:
    """Random params (normal, std 0.02), for tests and benchmarks."""
    return nn.unbox(jax.jit(_init, static_argnums=0)(config, jax.random.key(seed)))


@functools.lru_cache(maxsize=16)
def _boxed_shapes(config: ModelConfig, kernels: Kernels) -> dict:
    """The params tree of `_init` as shapes in their logical-axis boxes, built once per
    (config, kernels) and process: loading a checkpoint and placing it on a mesh both need
    it. Callers get new trees from it (`nn.unbox`, `nn.get_partition_spec`), never this one.

    Every block's params have the same shapes and axes (a Gemma 3 layer's type changes its
    attention, not its weights), so the init of a one-layer model is traced and its block
    repeated: tracing SmolLM2's 30-layer init took 2.3 s of every checkpoint load on a CPU.
    """
    if config.num_layers == 1:
        return _traced_shapes(config, kernels)
    one = _traced_shapes(config.replace(num_layers=1, layer_types=config.layer_types[:1]), kernels)
    out = {}
    for key, value in one.items():
        if key == "layers_0":
            out.update({f"layers_{i}": value for i in range(config.num_layers)})
        else:
            out[key] = value
    return out


@functools.lru_cache(maxsize=16)
def _traced_shapes(config: ModelConfig, kernels: Kernels) -> dict:
    return jax.eval_shape(lambda: _init(config, jax.random.key(0), kernels))


def param_shapes(config: ModelConfig) -> dict:
    """The params tree as `jax.ShapeDtypeStruct`s, without allocating anything."""
    return nn.unbox(_boxed_shapes(config, XLA))


def logical_axes(config: ModelConfig, kernels: Kernels = XLA) -> dict:
    """The params tree with each leaf replaced by its logical axis names (a PartitionSpec),
    for the layout `prepare_params(params, config, kernels)` makes (the `jaxsparse.sharding`
    table maps the names to mesh axes)."""
    return nn.get_partition_spec(_boxed_shapes(config, kernels))


def cache_logical_axes(config: ModelConfig) -> dict:
    """The KV cache tree of `init_cache` with each leaf replaced by its logical axis names:
    rows over "batch", k/v over "kv_heads" (the heads whose k/v projections a device
    computes, so that a decode step's attention needs no exchange)."""
    from jax.sharding import PartitionSpec as P

    kv = P("batch", "kv_heads", None, "head_dim")
    out: dict = {"pos": P("batch", None)}
    for i in range(config.num_layers):
        out[f"layers_{i}"] = {"k": kv, "v": kv}
    return out


def state_logical_axes(tree: dict) -> dict:
    """The model's `thresholds=` tree (`SparsityState.thresholds_for_model()`) with each
    leaf replaced by its logical axis names (a PartitionSpec; scalars replicated): a
    point's thresholds as the activations they threshold (`jaxsparse.rules.POINT_AXES`),
    Deja Vu predictor weights by `jaxsparse.models.predictor.PREDICTOR_AXES`."""
    from jax.sharding import PartitionSpec as P

    from jaxsparse.models.predictor import PREDICTOR_AXES
    from jaxsparse.rules import POINT_AXES

    def layer(th: dict) -> dict:
        out = {}
        for key, v in th.items():
            if key in POINT_AXES:
                out[key] = P(POINT_AXES[key])
            elif key == "predictor":
                out[key] = {k: P(*PREDICTOR_AXES.get(k, ())) for k in v}
            else:  # relax_tau, k's: scalars
                out[key] = jax.tree.map(lambda _: P(), v)
        return out

    return {name: layer(th) for name, th in tree.items()}
