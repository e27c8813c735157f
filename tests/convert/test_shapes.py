"""Full-size shapes (Llama-3-8B) through the key maps, with `jax.eval_shape`: no allocation."""

from __future__ import annotations

import jax

from convert.keymaps import expected_source_shape, gguf_key_map, hf_key_map
from jaxsparse.config import ModelConfig
from jaxsparse.models import param_shapes

LLAMA3_8B = {  # config.json of meta-llama/Meta-Llama-3.1-8B
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
}
# The shapes of the HF checkpoint's tensors ([out, in] for linear layers).
HF_SHAPES = {
    "model.embed_tokens.weight": (128256, 4096),
    "lm_head.weight": (128256, 4096),
    "model.norm.weight": (4096,),
    "model.layers.31.input_layernorm.weight": (4096,),
    "model.layers.0.self_attn.q_proj.weight": (4096, 4096),
    "model.layers.0.self_attn.k_proj.weight": (1024, 4096),
    "model.layers.0.self_attn.v_proj.weight": (1024, 4096),
    "model.layers.0.self_attn.o_proj.weight": (4096, 4096),
    "model.layers.7.mlp.gate_proj.weight": (14336, 4096),
    "model.layers.7.mlp.up_proj.weight": (14336, 4096),
    "model.layers.7.mlp.down_proj.weight": (4096, 14336),
}


def test_llama3_8b_shapes_without_allocating():
    config = ModelConfig.from_hf(LLAMA3_8B, dtype="bfloat16")
    shapes = param_shapes(config)
    leaves = jax.tree.leaves(shapes)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    n = sum(x.size for x in leaves)
    assert n == 8_030_261_248  # Llama-3-8B's parameter count
    assert {str(x.dtype) for x in leaves} == {"bfloat16"}
    flat = {
        tuple(k.key for k in p): s.shape for p, s in jax.tree_util.tree_flatten_with_path(shapes)[0]
    }
    key_map = hf_key_map(config)
    assert len(key_map) == len(flat) == 2 + 1 + 32 * 9
    for name, want in HF_SHAPES.items():
        rule = key_map[name]
        assert expected_source_shape(rule, flat[rule.path]) == want, name
    gguf = gguf_key_map(config, "llama")
    assert {r.path for r in gguf.values()} == set(flat)
    assert gguf["blk.0.attn_k.weight"].unpermute_heads == 8
    assert gguf["blk.0.attn_q.weight"].unpermute_heads == 32
