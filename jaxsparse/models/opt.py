"""OPT: LayerNorm, ReLU FFN (fc1, fc2), learned positions with an offset of 2, biases,
`do_layer_norm_before` (pre- or post-norm), and project_in/out where
`word_embed_proj_dim` differs from the hidden size. The output projection is tied to the
token embeddings, as in every released OPT.

The FFN's `gate` point is ReLU(x W1 + b1): it has natural zeros, and an optional
threshold zeroes more; zeroed channels skip rows of fc2 like a zeroed SwiGLU gate.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxsparse.config import ModelConfig
from jaxsparse.models.attention import SelfAttention, _sparse
from jaxsparse.models.layers import (
    XLA,
    BlockAccumulators,
    Embed,
    Kernels,
    LayerNorm,
    Linear,
    SharedAccumulator,
    param_dtype,
)
from jaxsparse.models.llama import run_layers


class ReluFFN(nn.Module):
    config: ModelConfig
    kernels: Kernels = XLA

    @nn.compact
    def __call__(self, h_BxTxD, thresholds, acc: BlockAccumulators | None = None):
        """`acc`: the block's accumulators (pallas decode on GPU), else None."""
        c = self.config
        first = None if acc is None else acc.gate or acc.ffn
        down = None if acc is None else acc.down
        dt = param_dtype(c)
        kn = self.kernels
        x = _sparse(self, "ffn_in", h_BxTxD, thresholds)
        g = nn.relu(
            Linear(c.intermediate_size, ("embed", "mlp"), c.mlp_bias, dt, kn, name="fc1")(
                x, "ffn_in", shared=first
            )
        )
        g = _sparse(self, "gate", g, thresholds)
        # fc2 skips ReLU's own zeros too: counted whenever the step is a sparse one
        a = _sparse(self, "down_in", g, thresholds, count=thresholds is not None)
        # ReLU's zeros (and a gate threshold's) skip rows of fc2, as down_in does.
        point = "gate" if "gate" in kn.points else "down_in"
        return Linear(c.hidden_size, ("mlp", "embed"), c.mlp_bias, dt, kn, name="fc2")(
            a, point, shared=down
        )


class OPTBlock(nn.Module):
    config: ModelConfig
    kernels: Kernels = XLA

    @nn.compact
    def __call__(
        self, x_BxTxD, positions_BxT, kv_pos_BxS, rope, layer_cache, cache_index, thresholds
    ):
        c = self.config
        dt = param_dtype(c)
        pre = c.do_layer_norm_before
        attn_norm = LayerNorm(
            1e-5, c.layer_norm_elementwise_affine, dt, name="self_attn_layer_norm"
        )
        ffn_norm = LayerNorm(1e-5, c.layer_norm_elementwise_affine, dt, name="final_layer_norm")
        self.sow("taps", "block_in", x_BxTxD)
        h = attn_norm(x_BxTxD) if pre else x_BxTxD
        acc = SharedAccumulator.for_block(c, self.kernels, h)  # None unless pallas on GPU
        attn_acc = None if acc is None else acc.attn
        a, new_cache = SelfAttention(c, self.kernels, name="self_attn")(
            h, positions_BxT, kv_pos_BxS, None, layer_cache, cache_index, thresholds, attn_acc
        )
        x_BxTxD = x_BxTxD + a
        if not pre:
            x_BxTxD = attn_norm(x_BxTxD)
        h = ffn_norm(x_BxTxD) if pre else x_BxTxD
        x_BxTxD = x_BxTxD + ReluFFN(c, self.kernels, name="mlp")(h, thresholds, acc)
        if not pre:
            x_BxTxD = ffn_norm(x_BxTxD)
        return x_BxTxD, new_cache


class OPTForCausalLM(nn.Module):
    config: ModelConfig
    kernels: Kernels = XLA

    def setup(self):
        c = self.config
        dt = param_dtype(c)
        self.embed_tokens = Embed(c.vocab_size, c.embed_dim, dtype=dt)
        self.embed_positions = Embed(
            c.max_position_embeddings + c.position_offset,
            c.hidden_size,
            axes=("positions", "embed"),
            dtype=dt,
        )
        if c.word_embed_proj_dim:
            self.project_in = Linear(c.hidden_size, ("embed_proj", "embed"), False, dt)
            self.project_out = Linear(c.embed_dim, ("embed", "embed_proj"), False, dt)
        self.layers = [OPTBlock(c, self.kernels) for _ in range(c.num_layers)]
        if c.final_layer_norm:
            self.final_layer_norm = LayerNorm(1e-5, c.layer_norm_elementwise_affine, dt)

    def __call__(
        self,
        tokens_BxT,
        positions_BxT,
        cache=None,
        cache_index=0,
        thresholds=None,
        last_only: bool = False,
    ):
        """Same contract as `LlamaForCausalLM.__call__`."""
        c = self.config
        x = self.embed_tokens(tokens_BxT)
        if c.word_embed_proj_dim:
            x = self.project_in(x)
        pos_ids = jnp.maximum(positions_BxT, 0) + c.position_offset
        x = x + self.embed_positions(pos_ids)
        x, new_cache = run_layers(
            self.layers, x, positions_BxT, cache, cache_index, thresholds, None
        )
        if last_only:
            x = x[:, -1:]
        if c.final_layer_norm:
            x = self.final_layer_norm(x)
        if c.word_embed_proj_dim:
            x = self.project_out(x)
        return self.embed_tokens.attend(x), new_cache
