"""The Llama family: Llama-2/3/3.1/3.2, Mistral, Qwen2 and SmolLM2 (RMSNorm, RoPE, SwiGLU, GQA),
and Gemma 3 text models through the switches of `ModelConfig.is_gemma3` (GeGLU, `(1 + w)`
RMSNorm, q/k norms, norms after attention and around the FFN, scaled embeddings, and
sliding-window or global attention per layer, each with its RoPE base).

Holds the decoder block, the gated FFN with its sparsification points (`ffn_in`, `gate`,
`down_in`) and the causal LM. Layers are unrolled over per-layer params (`layers_0`, ...):
the decode path never slices stacked weights (docs/design.md, "Scan or unroll"). Each
block runs through one jitted function, so blocks of the same shapes are traced once
(`_call_block`).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsparse import rules
from jaxsparse.config import FULL, ModelConfig
from jaxsparse.models.attention import (
    APPLIED,
    SelfAttention,
    _plain_threshold,
    _sparse,
    _sparsified,
    raw_output,
)
from jaxsparse.models.layers import (
    XLA,
    BlockAccumulators,
    Embed,
    Kernels,
    Linear,
    PendingResidual,
    RMSNorm,
    SharedAccumulator,
    _one_device,
    param_dtype,
    rope_cos_sin,
    value_of,
)
from pallas_kernels.gated_matvec import ACTIVATIONS  # one table for the model and the kernel


class SwiGLU(nn.Module):
    """The gated FFN `(act(x Wg) * x Wu) Wd`: SiLU (SwiGLU), or gelu tanh for Gemma (GeGLU)."""

    config: ModelConfig
    kernels: Kernels = XLA

    @nn.compact
    def __call__(self, h_BxTxD, thresholds, acc: BlockAccumulators | None = None, raw=False):
        """`acc`: the block's accumulators (pallas decode on GPU), else None. `raw`: the
        output as (float32 array, first column), where down_proj's kernel left it
        (`attention.raw_output`)."""
        c = self.config
        shared = None if acc is None else acc.ffn
        down = None if acc is None else acc.down
        dt = param_dtype(c)
        kn = self.kernels
        x = _sparse(self, "ffn_in", h_BxTxD, thresholds)
        act = ACTIVATIONS[c.activation]
        m = c.intermediate_size
        u = None  # the up projection, where it is computed apart from the gate
        rule = None  # (activation, threshold) where gated_matvec applies the gate's rule
        if kn.fuse_gate_up:  # one [d, 2m] matmul, columns (gate_i, up_i) (`prepare_params`)
            gu = Linear(2 * m, ("embed", "mlp"), c.mlp_bias, dt, kn, name="gate_up_proj")(
                x, "ffn_in", shared=shared
            )
            gu = gu.reshape(*gu.shape[:-1], m, 2)
            pre, u = gu[..., 0], gu[..., 1]
        else:
            gate_proj = Linear(
                m, ("embed", "mlp"), c.mlp_bias, dt, kn, kn.gate_rows, name="gate_proj"
            )
            mask = None if thresholds is None else thresholds.get("masks", {}).get("gate")
            if mask is not None:  # Deja Vu: a predicted-inactive neuron skips its gate row too
                self.sow("stats", "gate_rows", rules.zero_fraction(mask))
                self.sow("zeros", "gate_rows", mask == 0)
                pre = gate_proj(x, gate=mask)  # mask * (x Wg); the kernel reads active rows only
            else:
                rule = _kernel_gate_rule(c, kn, x, thresholds)
                # gated_matvec takes pre whole: without a part of its own (acc.gate), a
                # slice of the shared buffer would be one more copy on GPU (XLA gives a
                # custom call's operand its own buffer)
                target = None if acc is None else acc.gate
                if target is None and rule is None:
                    target = shared
                pre = gate_proj(x, "ffn_in", accumulator=rule is not None, shared=target)
        # act(0) = 0: the mask survives it. pre is rounded to dt first (a no-op unless it
        # is the float32 accumulator, which the kernel path below takes as it is).
        g = act(pre.astype(dt).astype(jnp.float32)).astype(dt)
        g = _sparse(self, "gate", g, thresholds, fused=True)
        if u is None:
            up = Linear(m, ("embed", "mlp"), c.mlp_bias, dt, kn, kn.up_rows, name="up_proj")
            if rule is not None:  # gated_matvec makes g from pre itself (implies up_rows)
                a = up(x, gate=pre, gate_rule=rule)
            elif kn.up_rows:  # g * (x @ Wu^T), only the rows where g != 0 in a decode step
                a = up(x, gate=g)
            else:
                u = up(x, "ffn_in", shared=shared)
        if u is not None:
            self.sow("taps", "up", u)
            a = g * u
        # a sparse gate's zeros are down_in's too (rows of down_proj the kernel skips)
        count = _sparsified("down_in", thresholds) or _sparsified("gate", thresholds)
        a = _sparse(self, "down_in", a, thresholds, count=count)
        down_proj = Linear(c.hidden_size, ("mlp", "embed"), c.mlp_bias, dt, kn, name="down_proj")
        return raw_output(down_proj, a, "down_in", down, raw)


def _kernel_gate_rule(c: ModelConfig, kn: Kernels, x, thresholds):
    """`(activation, threshold)` for `gated_matvec` to apply to the gate's pre-activation
    inside the kernel, in a pallas decode step whose gate has a plain threshold (CATS,
    CHESS); None where the rule stays in XLA (no threshold, a Deja Vu mask, learning's
    relaxed threshold, a biased up projection, no gated kernel)."""
    if not (kn.up_rows and kn.gate_rule_in_kernel and kn.use("gate", x)):
        return None
    if c.mlp_bias or thresholds is None:
        return None
    if "gate" not in thresholds or "relax_tau" in thresholds:
        return None
    if "gate" in thresholds.get("masks", {}):
        return None
    return c.activation, thresholds["gate"]


class LlamaBlock(nn.Module):
    """One decoder block; `layer_type` (`ModelConfig.layer_type(i)`) matters for Gemma 3."""

    config: ModelConfig
    kernels: Kernels = XLA
    layer_type: str = FULL

    @nn.compact
    def __call__(
        self, x_BxTxD, positions_BxT, kv_pos_BxS, rope, layer_cache, cache_index, thresholds
    ):
        c = self.config
        dt = param_dtype(c)
        gemma = c.is_gemma3
        step = (positions_BxT, kv_pos_BxS, rope, layer_cache, cache_index)
        if self._fuses_norms(x_BxTxD, thresholds):
            return self._fused_norms_call(x_BxTxD, step, thresholds)
        x_BxTxD = value_of(x_BxTxD)
        self.sow("taps", "block_in", x_BxTxD)
        h = RMSNorm(c.norm_eps, dt, gemma, name="input_layernorm")(x_BxTxD)
        acc = SharedAccumulator.for_block(c, self.kernels, h)  # None unless pallas on GPU
        attn_acc = None if acc is None else acc.attn
        a, new_cache = SelfAttention(c, self.kernels, self.layer_type, name="self_attn")(
            h, positions_BxT, kv_pos_BxS, rope, layer_cache, cache_index, thresholds, attn_acc
        )
        if gemma:  # Gemma 3 norms the attention output, and the FFN's input and output
            a = RMSNorm(c.norm_eps, dt, True, name="post_attention_layernorm")(a)
            x_BxTxD = x_BxTxD + a
            h = RMSNorm(c.norm_eps, dt, True, name="pre_feedforward_layernorm")(x_BxTxD)
            f = SwiGLU(c, self.kernels, name="mlp")(h, thresholds, acc)
            f = RMSNorm(c.norm_eps, dt, True, name="post_feedforward_layernorm")(f)
            return x_BxTxD + f, new_cache
        x_BxTxD = x_BxTxD + a
        h = RMSNorm(c.norm_eps, dt, name="post_attention_layernorm")(x_BxTxD)
        x_BxTxD = x_BxTxD + SwiGLU(c, self.kernels, name="mlp")(h, thresholds, acc)
        return x_BxTxD, new_cache

    def _fuses_norms(self, x, thresholds) -> bool:
        """Whether this block runs its norms through `residual_rms_norm`
        (`Kernels.fused_norms`): a pallas decode step on one GPU (or its interpreter),
        not Gemma 3, no taps recorded (they want the norms' outputs before thresholds), and
        only plain thresholds at the norms' points (no Deja Vu masks, no relaxed
        thresholds while learning)."""
        c, kn = self.config, self.kernels
        if not kn.fused_norms or c.is_gemma3 or c.family != "llama" or self.is_initializing():
            return False
        if self.is_mutable_collection("taps") or not kn.shares_accumulator(x):
            return False
        if not _one_device(kn.mesh):
            return False
        if thresholds is None:
            return True
        if "relax_tau" in thresholds or thresholds.get("masks") or "predictor" in thresholds:
            return False
        d = c.hidden_size
        points = ("q_in", "kv_in", "ffn_in")
        return all(
            p not in thresholds or _plain_threshold(p, d, thresholds) is not None for p in points
        )

    def _fused_norms_call(self, x, step, thresholds):
        """The block with `_fuses_norms`: each norm one `residual_rms_norm` launch that also
        does the residual add before it (reading the o_proj or the previous block's
        down_proj output where its kernel left it) and the thresholds of the points after
        it; the first also zeroes the block's accumulators. Returns a `PendingResidual`:
        the next block's first norm does this block's last add."""
        c, kn = self.config, self.kernels
        dt = param_dtype(c)
        positions_BxT, kv_pos_BxS, rope, layer_cache, cache_index = step
        b = x.shape[0]
        acc = SharedAccumulator.for_block(c, kn, x)
        zeros = () if acc is None else acc.zero_shapes(b)
        attn_points = ("q_in",) if kn.fuse_qkv else ("q_in", "kv_in")  # fuse_qkv: k/v read q's
        out1, applied = self._norm("input_layernorm", x, attn_points, thresholds, zeros, dt)
        if acc is not None:
            acc.provide(out1.zeros)
        th = None if thresholds is None else {**thresholds, APPLIED: applied}
        h = applied[attn_points[0]] if out1.normed is None else out1.normed
        a, new_cache = SelfAttention(c, kn, self.layer_type, name="self_attn")(
            h,
            positions_BxT,
            kv_pos_BxS,
            rope,
            layer_cache,
            cache_index,
            th,
            None if acc is None else acc.attn,
            raw=True,
        )
        x = PendingResidual(out1.residual, *a)
        out2, applied = self._norm("post_attention_layernorm", x, ("ffn_in",), thresholds, (), dt)
        th = None if thresholds is None else {**thresholds, APPLIED: applied}
        f = SwiGLU(c, kn, name="mlp")(applied["ffn_in"], th, acc, raw=True)
        return PendingResidual(out2.residual, *f), new_cache

    def _norm(self, name, x, points, thresholds, zeros, dt):
        """One fused norm (`RMSNorm(fused=...)`): its `RmsNormOut`, and the input of each of
        `points` (the norm's output, thresholded where the point has a threshold)."""
        ts = [None if thresholds is None else thresholds.get(p) for p in points]
        given = [t for t in ts if t is not None]
        fused = {
            "thresholds": tuple(given),
            "normed": any(t is None for t in ts),
            "zeros": zeros,
            "impl": self.kernels.impl,
        }
        out = RMSNorm(self.config.norm_eps, dt, name=name)(x, fused=fused)
        kept = iter(out.kept)
        applied = {p: out.normed if t is None else next(kept) for p, t in zip(points, ts)}
        return out, applied


class LlamaForCausalLM(nn.Module):
    config: ModelConfig
    kernels: Kernels = XLA

    def setup(self):
        c = self.config
        dt = param_dtype(c)
        self.embed_tokens = Embed(c.vocab_size, c.hidden_size, dtype=dt)
        self.layers = [LlamaBlock(c, self.kernels, c.layer_type(i)) for i in range(c.num_layers)]
        self.norm = RMSNorm(c.norm_eps, dt, c.is_gemma3)
        if not c.tie_word_embeddings:
            self.lm_head = Linear(c.vocab_size, ("embed", "vocab"), False, dt)

    def __call__(
        self,
        tokens_BxT,
        positions_BxT,
        cache=None,
        cache_index=0,
        thresholds=None,
        last_only: bool = False,
    ):
        """Logits [B, T, V] (or [B, 1, V] with `last_only`) in float32, and the updated cache.

        `positions_BxT` holds each token's position, -1 on padding. `thresholds` maps
        `layers_i` to a dict of sparsification-point thresholds, or is None (dense).
        """
        c = self.config
        x = self.embed_tokens(tokens_BxT)
        if c.is_gemma3:  # HF: embedding * sqrt(hidden), the scale cast to the params' dtype
            x = x * jnp.asarray(c.hidden_size**0.5, x.dtype)
        rope = rope_tables(c, positions_BxT)
        x, new_cache = run_layers(
            self.layers, x, positions_BxT, cache, cache_index, thresholds, rope
        )
        x = value_of(x)
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        if c.tie_word_embeddings:
            logits = self.embed_tokens.attend(x)
        else:
            logits = self.lm_head(x).astype(jnp.float32)
        return logits, new_cache


def rope_tables(config: ModelConfig, positions_BxT: jax.Array):
    """RoPE (cos, sin) for the blocks: one pair, or a dict of pairs by layer type where
    layers differ (Gemma 3's sliding and global layers have different bases)."""
    if not config.layer_types:
        return rope_cos_sin(config, positions_BxT)
    return {t: rope_cos_sin(config, positions_BxT, t) for t in sorted(set(config.layer_types))}


def run_layers(layers, x, positions_BxT, cache, cache_index, thresholds, rope):
    """Runs the unrolled blocks, threading the KV cache; shared by every family."""
    if cache is not None:
        kv_pos = jax.lax.dynamic_update_slice_in_dim(
            cache["pos"], positions_BxT.astype(jnp.int32), cache_index, axis=1
        )
        new_cache = {"pos": kv_pos}
    else:
        kv_pos, new_cache = positions_BxT, None
    prev_in = x  # the residual entering the previous block (Deja Vu lookahead)
    for i, layer in enumerate(layers):
        name = f"layers_{i}"
        th = None if thresholds is None else thresholds[name]
        if th is not None and "predictor" in th:
            th = with_predicted_masks(th, value_of(prev_in))
        prev_in = x
        args = (x, positions_BxT, kv_pos, rope, None if cache is None else cache[name])
        x, layer_cache = _call_block(layer, args, cache_index, th)
        if new_cache is not None:
            new_cache[name] = layer_cache
    return x, new_cache


# The variable collections the blocks write with `sow` (taps, statistics, zero counts).
SOWN_COLLECTIONS = ("taps", "stats", "zeros")


def _call_block(layer: nn.Module, args: tuple, cache_index, th):
    """`layer(*args, cache_index, th)`, traced once per distinct block.

    Tracing a flax block is Python work (~0.1 s per SmolLM2 block on a CPU); the unrolled
    30-layer model traced it 30 times per jitted function (prefill, decode step, ...). Here
    the block runs through `_apply_block`, a `jax.jit` whose trace cache is keyed by the
    unbound block (its config, kernels and layer type) and the arguments' shapes: every
    block with the same shapes reuses one trace, and the lowered program calls one function.
    XLA inlines those calls when it compiles (an H200 decode step ran at the same speed).
    Initialization (params are created) runs the block directly.
    """
    if layer.is_initializing():
        return layer(*args, cache_index, th)
    mutable = tuple(c for c in SOWN_COLLECTIONS if layer.is_mutable_collection(c))
    params = layer.variables["params"]
    unbound = layer.clone(parent=None, name=None)
    (x, new_cache), sown = _apply_block(unbound, mutable, params, args, cache_index, th)
    for col, tree in sown.items():
        for key, value in tree.items():
            layer.put_variable(col, key, value)
    return x, new_cache


@functools.partial(jax.jit, static_argnums=(0, 1))
def _apply_block(block: nn.Module, mutable: tuple, params, args, cache_index, th):
    out, state = block.apply({"params": params}, *args, cache_index, th, mutable=list(mutable))
    return out, {c: state[c] for c in mutable if c in state}


def with_predicted_masks(th: dict, x_prev_BxTxD):
    """A layer's sparsity dict with its Deja Vu predictor replaced by the masks it predicts
    from the residual entering the previous block (`jaxsparse.models.predictor`): `gate` keeps
    the top `ffn_k` neurons, `o_in` the `head_dim` channels of the top `head_k` heads."""
    from jaxsparse.models.predictor import predicted_masks

    th = dict(th)
    ffn_keep, head_keep = predicted_masks(th.pop("predictor"), x_prev_BxTxD)
    head_dim = th["o_in"].shape[-1] // head_keep.shape[-1]
    th["masks"] = {
        **th.get("masks", {}),
        "gate": ffn_keep,
        "o_in": jnp.repeat(head_keep, head_dim, axis=-1),
    }
    return th
