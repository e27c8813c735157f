"""WINA's premise on SmolLM2: rotate the model so that the weight rows each input channel
multiplies are (closer to) orthogonal, then compare `teal` and `wina` on it.

WINA's ranking `|x_i| * ||W_i||` is optimal when the rows of W (stored [in, out]) are
orthogonal; its paper makes them so with a transform of the weights. This script writes
an exactly equivalent checkpoint (same logits up to float32 rounding, checked here) with
one of two rotations that cost nothing at inference:

- `residual`: the RMSNorm scales are folded into the projections that read them, and the
  residual stream is rotated by one orthogonal Q: the eigenvectors of the sum, over every
  layer and every projection reading the stream (q, k, v, gate, up), of its rows' Gram
  matrix `W W^T` (normalized). In that basis the average Gram matrix is diagonal. The
  embedding, o_proj's and down_proj's outputs and lm_head (untied) absorb Q.
- `vo`: per kv head group, v_proj's output and the group's o_proj rows are rotated by the
  eigenvectors of the group's o_proj row Gram matrix, so o_proj's input rows are
  orthogonal on average within each group (RoPE does not touch v).
- `both`: the two.

Usage (then `jaxsparse sweep --model OUT ...`, as in README.md here):
    python benchmarks/results/smollm2_cpu_wina/rotation.py vo OUT
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse.checkpoint import save_checkpoint
from jaxsparse.loading import load_model
from jaxsparse.models import build_model

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("mode", choices=("residual", "vo", "both"))
ap.add_argument("out", help="checkpoint directory to write (must not exist)")
args = ap.parse_args()

m = load_model()  # the embedded SmolLM2-135M-Instruct, float32
c = m.config
if c.family != "llama" or c.is_gemma3:
    raise SystemExit("rotation.py: Llama-family models only (RMSNorm before every block)")
P = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), m.params)
L, d, hd, H, K = c.num_layers, c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads
residual = args.mode in ("residual", "both")
E = P["embed_tokens"]["embedding"]
lm = E.T  # [d, V]
Q = np.eye(d)
if residual:  # fold the norms' scales into what reads them
    for i in range(L):
        b = P[f"layers_{i}"]
        g1, g2 = b["input_layernorm"]["scale"], b["post_attention_layernorm"]["scale"]
        for n in ("q_proj", "k_proj", "v_proj"):
            b["self_attn"][n]["kernel"] = g1[:, None] * b["self_attn"][n]["kernel"]
        for n in ("gate_proj", "up_proj"):
            b["mlp"][n]["kernel"] = g2[:, None] * b["mlp"][n]["kernel"]
        b["input_layernorm"]["scale"] = np.ones(d)
        b["post_attention_layernorm"]["scale"] = np.ones(d)
    lm = P["norm"]["scale"][:, None] * lm
    P["norm"]["scale"] = np.ones(d)
    M = np.zeros((d, d))
    for i in range(L):
        b = P[f"layers_{i}"]
        readers = [b["self_attn"][n]["kernel"] for n in ("q_proj", "k_proj", "v_proj")]
        readers += [b["mlp"][n]["kernel"] for n in ("gate_proj", "up_proj")]
        for W in readers:
            G = W @ W.T
            M += G / np.linalg.norm(G)
    Q = np.linalg.eigh(M)[1]
for i in range(L):
    b = P[f"layers_{i}"]
    for n in ("q_proj", "k_proj", "v_proj"):
        b["self_attn"][n]["kernel"] = Q.T @ b["self_attn"][n]["kernel"]
    for n in ("gate_proj", "up_proj"):
        b["mlp"][n]["kernel"] = Q.T @ b["mlp"][n]["kernel"]
    b["self_attn"]["o_proj"]["kernel"] = b["self_attn"]["o_proj"]["kernel"] @ Q
    b["mlp"]["down_proj"]["kernel"] = b["mlp"]["down_proj"]["kernel"] @ Q
    if args.mode in ("vo", "both"):
        Wo, Wv = b["self_attn"]["o_proj"]["kernel"], b["self_attn"]["v_proj"]["kernel"]
        rep = H // K
        for g in range(K):
            heads = range(g * rep, (g + 1) * rep)
            R = np.linalg.eigh(sum(Wo[h * hd : (h + 1) * hd] @ Wo[h * hd : (h + 1) * hd].T for h in heads))[1]
            Wv[:, g * hd : (g + 1) * hd] = Wv[:, g * hd : (g + 1) * hd] @ R
            for h in heads:
                Wo[h * hd : (h + 1) * hd] = R.T @ Wo[h * hd : (h + 1) * hd]
P["embed_tokens"]["embedding"] = E @ Q
P["lm_head"] = {"kernel": Q.T @ lm}
c2 = dataclasses.replace(c, tie_word_embeddings=False)
P2 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), P)
toks = jnp.asarray([[1, 504, 3145, 2491, 314, 253, 1178, 30, 906]])
pos = jnp.arange(toks.shape[1])[None]
before = build_model(c).apply({"params": m.params}, toks, pos)
after = build_model(c2).apply({"params": P2}, toks, pos)
before = before[0] if isinstance(before, tuple) else before
after = after[0] if isinstance(after, tuple) else after
err = float(jnp.max(jnp.abs(before - after)))
print(f"max |logit change| {err:.2e} (max |logit| {float(jnp.max(jnp.abs(before))):.1f})")
if err > 1e-3:
    raise SystemExit("rotation.py: the rotated model does not compute the same logits")
save_checkpoint(args.out, c2, P2, m.tokenizer)
print("wrote", args.out)
