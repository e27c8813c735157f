"""Full-size models, shapes only: Llama-3-8B, SmolLM2-135M and Gemma 3 270M, traced with
`jax.eval_shape` (no weights are allocated and nothing is computed), for every weight
layout the kernels use (`jaxsparse.models.Kernels`, `prepare_params`):

- the params `prepare_params` lays out are, leaf by leaf, the shapes the layout promises
  (written out below from the config, not read from the code under test), in the config's
  dtype, and are the tree the model built with those kernels declares;
- one decode step (one token per row, KV cache and sparsity state given) returns logits
  `[B, 1, vocab]` in float32 and a cache of the shapes it was given;
- on a (data=8, model=8) mesh (`jax.sharding.AbstractMesh`: no devices needed) every
  param, KV-cache and sparsity-state leaf's logical axes map, through the table of
  `jaxsparse.sharding`, to a PartitionSpec whose split dimensions divide evenly, each on
  the mesh axis the table names; every rule of the table is used by some leaf.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from jaxsparse.config import ModelConfig, full_size_shapes
from jaxsparse.models import (
    Kernels,
    build_model,
    cache_logical_axes,
    init_cache,
    logical_axes,
    param_shapes,
    prepare_params,
    state_logical_axes,
)
from jaxsparse.registry import KERNEL_POINTS, kernels_for_method
from jaxsparse.rules import TENSORS
from jaxsparse.sharding import DATA, LOGICAL_AXIS_RULES, MODEL, logical_to_mesh, tree_shardings
from jaxsparse.sparsity import model_widths

# The full-size configs the benchmarks use (jaxsparse.config.full_size_shapes): Llama-3-8B,
# SmolLM2-135M, and Gemma 3 270M's HF config.json fields (as tests/convert/
# test_gemma3_gguf.py checks them on the real GGUF), built through `ModelConfig.from_hf`.
FULL_MODELS = full_size_shapes()
LLAMA3_8B, SMOLLM2_135M, GEMMA3_270M = (
    FULL_MODELS[k] for k in ("llama3-8b", "smollm2-135m", "gemma3-270m")
)


def _first_layers(c: ModelConfig, n: int) -> ModelConfig:
    return c.replace(num_layers=n, layer_types=c.layer_types[:n])


# The same widths with the first layers only (every layer has the same shapes; Gemma 3
# keeps its first global layer, layer 5, and the sliding ones before it), for the layout
# matrix; `test_full_depth` traces every layer.
# OPT (learned positions, and an embedding projection as in OPT-350M), two layers
OPT_PROJ = ModelConfig.from_hf(
    {
        "model_type": "opt",
        "vocab_size": 50272,
        "hidden_size": 1024,
        "ffn_dim": 4096,
        "num_hidden_layers": 2,
        "num_attention_heads": 16,
        "max_position_embeddings": 2048,
        "word_embed_proj_dim": 512,
    },
    dtype="bfloat16",
)
MODELS = {
    "llama3-8b": _first_layers(LLAMA3_8B, 2),
    "smollm2-135m": _first_layers(SMOLLM2_135M, 2),
    "gemma3-270m": _first_layers(GEMMA3_270M, 6),
}

# Every weight layout: plain; q/k/v fused; k/v fused; up_proj rows [m, d] for the gated
# kernel (CATS/CHESS); gate_proj rows too (Deja Vu neurons); q rows with head-sparse
# attention (Deja Vu heads); and both (the dejavu method's setup).
GATED = ("gate", "down_in")
LAYOUTS = {
    "xla": Kernels(),
    "fused-qkv": Kernels(fuse_qkv=True),
    "fused-kv": Kernels(fuse_kv=True),
    "up-rows": Kernels("pallas", fuse_qkv=True, points=GATED),
    "up-rows-fused-kv": Kernels("pallas", fuse_kv=True, points=("q_in", "kv_in", "o_in", *GATED)),
    "gate-rows": Kernels("pallas", fuse_qkv=True, points=GATED, gate_proj_rows=True),
    "q-rows-heads": Kernels("pallas", fuse_kv=True, points=("o_in",), head_attention=True),
    "gate-up-fused": kernels_for_method("teal"),
    "gate-up-fused-kv": kernels_for_method("teal-learned"),
    "dejavu": kernels_for_method("dejavu"),
}
CASES = [(m, lay) for m in MODELS for lay in LAYOUTS]
MESH = AbstractMesh((8, 8), (DATA, MODEL))
B, S = 16, 64  # decode rows (a multiple of data=8), cache length
RANK = 128  # Deja Vu predictor rank


def _flags(kn: Kernels) -> tuple:
    return (kn.fuse_qkv, kn.fuse_kv, kn.fuse_gate_up, kn.up_rows, kn.gate_rows, kn.q_rows)


def test_every_method_uses_a_layout_tested_here():
    """A method whose kernels lay the weights out otherwise must get a row in LAYOUTS."""
    tested = {_flags(kn) for kn in LAYOUTS.values()}
    for method in KERNEL_POINTS:
        for mode in ("xla", "pallas"):
            kn = kernels_for_method(method, mode)
            assert _flags(kn) in tested, (method, mode, kn)


def expected_params(c: ModelConfig, kn: Kernels) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Path -> shape of every param after `prepare_params(params, c, kn)`, from the config:
    kernels `[in, out]`, or `[out, in]` where the layout stores rows."""
    d, m, q, kv, v = c.hidden_size, c.intermediate_size, c.q_dim, c.kv_dim, c.vocab_size
    out = {("embed_tokens", "embedding"): (v, d), ("norm", "scale"): (d,)}
    if not c.tie_word_embeddings:
        out[("lm_head", "kernel")] = (d, v)
    for i in range(c.num_layers):
        L = f"layers_{i}"
        attn: dict[str, tuple[int, ...]] = {"o_proj": (q, d)}
        if kn.fuse_qkv:
            attn["qkv_proj"] = (d, q + 2 * kv)
        else:
            attn["q_proj"] = (q, d) if kn.q_rows else (d, q)
            if kn.fuse_kv:
                attn["kv_proj"] = (d, 2 * kv)
            else:
                attn["k_proj"] = attn["v_proj"] = (d, kv)
        for name, shape in attn.items():
            out[(L, "self_attn", name, "kernel")] = shape
        mlp = {
            "gate_proj": (m, d) if kn.gate_rows else (d, m),
            "up_proj": (m, d) if kn.up_rows else (d, m),
            "down_proj": (m, d),
        }
        if kn.fuse_gate_up:
            del mlp["gate_proj"], mlp["up_proj"]
            mlp["gate_up_proj"] = (d, 2 * m)
        for name, shape in mlp.items():
            out[(L, "mlp", name, "kernel")] = shape
        norms = ["input_layernorm", "post_attention_layernorm"]
        if c.is_gemma3:
            norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
            out[(L, "self_attn", "q_norm", "scale")] = (c.head_dim,)
            out[(L, "self_attn", "k_norm", "scale")] = (c.head_dim,)
        for name in norms:
            out[(L, name, "scale")] = (d,)
    return out


def _path(keys) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", k)) for k in keys)


def _flat(tree, is_leaf=None) -> dict:
    return {_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf)[0]}


def _is_spec(x) -> bool:
    return isinstance(x, PartitionSpec) or x is None


_PARAM_SHAPES: dict = {}


def prepared_shapes(c: ModelConfig, kn: Kernels) -> dict:
    """`prepare_params` on the config's params, as ShapeDtypeStructs."""
    if c not in _PARAM_SHAPES:
        _PARAM_SHAPES[c] = param_shapes(c)
    return jax.eval_shape(lambda p: prepare_params(p, c, kn), _PARAM_SHAPES[c])


@pytest.fixture(scope="module")
def prepared():
    """(model, layout) -> prepare_params' output for MODELS (traced once per module)."""
    cache: dict = {}

    def get(model: str, layout: str) -> dict:
        if (model, layout) not in cache:
            cache[model, layout] = prepared_shapes(MODELS[model], LAYOUTS[layout])
        return cache[model, layout]

    return get


def check_layout(c: ModelConfig, kn: Kernels, params: dict) -> None:
    got = _flat(params)
    want = expected_params(c, kn)
    assert sorted(got) == sorted(want), (
        f"missing {sorted(set(want) - set(got))}, unexpected {sorted(set(got) - set(want))}"
    )
    for path, shape in want.items():
        assert got[path].shape == shape, (path, got[path].shape, shape)
        assert got[path].dtype == jnp.bfloat16, (path, got[path].dtype)
    # the tree the model built with these kernels declares (and names the axes of)
    specs = _flat(logical_axes(c, kn), _is_spec)
    assert sorted(specs) == sorted(want)
    for path, spec in specs.items():
        assert len(spec) == len(want[path]), (path, spec)


@pytest.mark.parametrize("model,layout", CASES)
def test_prepare_params_gives_the_layout(prepared, model, layout):
    check_layout(MODELS[model], LAYOUTS[layout], prepared(model, layout))


def _thresholds(c: ModelConfig, kn: Kernels) -> dict:
    """A sparsity state's `thresholds=` tree as ShapeDtypeStructs: every point's vector,
    and a Deja Vu predictor where the layout runs Deja Vu masks."""
    widths = model_widths(c)
    f32 = jnp.float32
    tree = {}
    for i in range(c.num_layers):
        layer: dict = {p: jax.ShapeDtypeStruct((widths[p],), f32) for p in TENSORS}
        if kn.gate_rows or kn.q_rows:
            d, m, h, r = c.hidden_size, c.intermediate_size, c.num_heads, RANK
            shapes = {
                "ffn_w1": (d, r),
                "ffn_b1": (r,),
                "ffn_w2": (r, m),
                "ffn_b2": (m,),
                "head_w1": (d, r),
                "head_b1": (r,),
                "head_w2": (r, h),
                "head_b2": (h,),
            }
            pred = {k: jax.ShapeDtypeStruct(s, f32) for k, s in shapes.items()}
            pred["ffn_k"] = pred["head_k"] = jax.ShapeDtypeStruct((), jnp.int32)
            layer["predictor"] = pred
        tree[f"layers_{i}"] = layer
    return tree


def _cache(c: ModelConfig) -> dict:
    return jax.eval_shape(lambda: init_cache(c, B, S))


def check_decode(c: ModelConfig, kn: Kernels, params: dict) -> None:
    kn = Kernels(**{**kn.__dict__, "impl": "gpu_interpret"}) if kn.mode == "pallas" else kn
    net = build_model(c, kn)
    cache = _cache(c)
    tok = jax.ShapeDtypeStruct((B, 1), jnp.int32)

    def step(params, tokens, cache, thresholds):
        pos = jnp.full((B, 1), 5, jnp.int32)
        return net.apply({"params": params}, tokens, pos, cache, 5, thresholds)

    logits, new_cache = jax.eval_shape(step, params, tok, cache, _thresholds(c, kn))
    assert (logits.shape, logits.dtype) == ((B, 1, c.vocab_size), jnp.float32)
    want = {p: (x.shape, x.dtype) for p, x in _flat(cache).items()}
    assert {p: (x.shape, x.dtype) for p, x in _flat(new_cache).items()} == want
    assert want[("layers_0", "k")] == ((B, c.num_kv_heads, S, c.head_dim), jnp.bfloat16)


@pytest.mark.parametrize("model,layout", CASES)
def test_one_decode_step_shapes(prepared, model, layout):
    check_decode(MODELS[model], LAYOUTS[layout], prepared(model, layout))


def _check_specs(logical: dict, shapes: dict, where: str) -> dict[str, int]:
    """Each leaf's mesh PartitionSpec on MESH (through `tree_shardings`, as the params are
    placed): one entry per dimension; a split dimension is split on the mesh axis the
    table names for its logical axis and divides evenly; a dimension the table splits is
    left whole only when the axis does not divide it or an earlier dimension uses the axis.
    Returns how often each logical name is split."""
    table = dict(LOGICAL_AXIS_RULES)
    shardings = _flat(tree_shardings(logical, shapes, MESH), lambda x: hasattr(x, "spec"))
    specs = _flat(logical, _is_spec)
    arrays = _flat(shapes)
    assert sorted(shardings) == sorted(arrays) == sorted(specs), where
    split: dict[str, int] = {}
    for path, arr in arrays.items():
        names = tuple(specs[path] or ())
        mesh_spec = tuple(shardings[path].spec)
        mesh_spec += (None,) * (arr.ndim - len(mesh_spec))
        assert len(names) in (0, arr.ndim), (where, path, names, arr.shape)
        names += (None,) * (arr.ndim - len(names))
        used: set[str] = set()
        for dim, name, axis in zip(arr.shape, names, mesh_spec):
            if axis is not None:
                assert axis == table[name], (where, path, name, axis)
                assert dim % MESH.shape[axis] == 0, (where, path, dim, axis)
                used.add(axis)
                split[name] = split.get(name, 0) + 1
            elif name is not None and table[name] is not None:
                want = table[name]
                assert want in used or dim % MESH.shape[want], (where, path, name, dim)
    return split


def check_sharding(c: ModelConfig, kn: Kernels, params: dict, model: str) -> None:
    layout = next(k for k, v in LAYOUTS.items() if v == kn)
    split = _check_specs(logical_axes(c, kn), params, f"{model}/{layout} params")
    cache = _cache(c)
    split_cache = _check_specs(cache_logical_axes(c), cache, f"{model} cache")
    assert split_cache["batch"] == 2 * c.num_layers + 1  # every k, v and pos split over data
    state = _thresholds(c, kn)
    _check_specs(state_logical_axes(state), state, f"{model}/{layout} state")
    if model == "llama3-8b":  # every head and FFN axis divides by 8: all split
        specs = _flat(logical_axes(c, kn), _is_spec)
        # the embedding and LM head stay whole (the vocabulary: jaxsparse/sharding.py)
        vocab = {p for p, s in specs.items() if "vocab" in tuple(s)}
        assert vocab == {("embed_tokens", "embedding"), ("lm_head", "kernel")}
        for path, arr in _flat(params).items():
            if arr.ndim == 2:
                spec = logical_to_mesh(specs[path], MESH, shape=arr.shape)
                assert (MODEL in tuple(spec)) != (path in vocab), (path, spec)
        assert split_cache["kv_heads"] == 2 * c.num_layers
        blocks = [a for p, a in _flat(params).items() if p not in vocab]
        per_device = sum(
            np.prod(a.shape) // (MESH.shape[MODEL] if a.ndim == 2 else 1) for a in blocks
        )
        total = sum(np.prod(a.shape) for a in blocks)
        assert per_device < total / 7.9  # an eighth of the blocks' weights each, norms aside
    assert split


@pytest.mark.parametrize("model,layout", CASES)
def test_every_leaf_resolves_on_a_data8_model8_mesh(prepared, model, layout):
    check_sharding(MODELS[model], LAYOUTS[layout], prepared(model, layout), model)


@pytest.mark.slow  # ~5 s each (every layer traced); the file ~35 s with them
@pytest.mark.parametrize("model", FULL_MODELS)
def test_full_depth(model):
    """Every layer of the full model, in the layout with the most changes (Deja Vu: gate,
    up and q rows, k/v fused, predictors in the state)."""
    c, kn = FULL_MODELS[model], LAYOUTS["dejavu"]
    params = prepared_shapes(c, kn)
    check_layout(c, kn, params)
    check_decode(c, kn, params)
    check_sharding(c, kn, params, model)


def test_every_rule_of_the_table_is_used():
    """Each logical name of the table names some leaf (params of some layout, the cache, a
    Deja Vu state, or OPT's learned positions and embedding projection), and each that
    maps to a mesh axis splits a Llama-3-8B leaf."""
    names: set[str] = set()
    split: set[str] = set()
    c = MODELS["llama3-8b"]
    for layout, kn in LAYOUTS.items():
        params = prepared_shapes(c, kn)
        split |= set(_check_specs(logical_axes(c, kn), params, layout))
        state = _thresholds(c, kn)
        split |= set(_check_specs(state_logical_axes(state), state, layout))
        for tree in (logical_axes(c, kn), cache_logical_axes(c), state_logical_axes(state)):
            for spec in _flat(tree, _is_spec).values():
                names |= {n for n in tuple(spec or ()) if n is not None}
    split |= set(_check_specs(cache_logical_axes(c), _cache(c), "cache"))
    opt = OPT_PROJ
    split |= set(_check_specs(logical_axes(opt), param_shapes(opt), "opt"))
    names |= {n for s in _flat(logical_axes(opt), _is_spec).values() for n in s if n}
    table = dict(LOGICAL_AXIS_RULES)
    assert names == set(table), (set(table) - names, names - set(table))
    assert split == {n for n, axis in table.items() if axis is not None}
