"""Tiny random configs and a byte tokenizer shared by the CPU tests of fitting and
evaluation (importable from any test module in tests/: pytest puts this folder on sys.path)."""

from jaxsparse.config import ModelConfig

LLAMA = ModelConfig(
    model_type="llama",
    vocab_size=260,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    eos_token_ids=(0,),
)
OPT = ModelConfig(
    model_type="opt",
    vocab_size=260,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=4,
    head_dim=8,
    eos_token_ids=(0,),
    qkv_bias=True,
    o_bias=True,
    mlp_bias=True,
    tie_word_embeddings=True,
    position_offset=2,
    max_position_embeddings=128,
)


class ByteTok:
    eos_token_id = 0

    def encode(self, text, add_special_tokens=False):
        return [b + 1 for b in text.encode()]
