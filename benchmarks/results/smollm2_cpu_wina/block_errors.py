"""Block-level check of WINA's score against TEAL's on calibration text (SmolLM2 by default).

For every block, thresholds at one per-group sparsity S (exact quantiles over the first
TOKENS calibration tokens, the same tokens the errors are measured on) for candidates:
  teal         quantile_S(|x_i|) on every input (alpha = 0)
  wina         quantile_S(|x_i| * n_i) on every input, n_i the row norm of the weights
               input channel i multiplies (`jaxsparse.methods.statistics.input_row_norms`)
  wina_<group> wina on that group only, teal on the others
  alpha_<a>    the score |x_i| * n_i ** a on every input
With a fourth argument `ref`, the candidates are instead the norms WINA's reference code
gives each input (its `k_proj` and `gate_proj` column norms, 1 elsewhere) and their parts:
  ref          q/k/v input scored with the k_proj row norms, gate/up input with the
               gate_proj row norms, o and down inputs as TEAL (norm 1)
  ref_od       ref, plus WINA's norms on the o and down inputs
  k_only, gate_only, od_only   one of those parts alone, TEAL elsewhere
and the block's output error ||block(x; thresholds) - block(x; dense)||_2 over those tokens
(`jaxsparse.methods.teal.make_block_error_fn`: the objective of TEAL's greedy allocation),
with the dense model's residual entering the block as its input.

With `sep` instead, q and k|v get masks of their own (points q_in and kv_in, as CHESS+
has them), each scored with the norms of its own projection's rows:
  sep          q_in by q_proj's row norms, kv_in by the norms of [k_proj | v_proj] rows,
               the other inputs by WINA's norms as in `wina`
  sep_qkv      the same on q_in and kv_in, TEAL elsewhere
  sep_od       the same on q_in and kv_in, WINA's norms on o and down, TEAL on gate/up

usage: python block_errors.py OUT.json [S] [TOKENS] [ref|sep]
"""

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse import data as D
from jaxsparse.loading import load_model
from jaxsparse.measure import dense_taps, tap
from jaxsparse.methods.statistics import collect_block_inputs, input_row_norms
from jaxsparse.methods.teal import GROUP_HIST, make_block_error_fn
from jaxsparse.models import build_model
from jaxsparse.sparsity import model_widths

out_path = sys.argv[1]
S = float(sys.argv[2]) if len(sys.argv) > 2 else 0.39
TOKENS = int(sys.argv[3]) if len(sys.argv) > 3 else 1024
REF = len(sys.argv) > 4 and sys.argv[4] == "ref"
SEP = len(sys.argv) > 4 and sys.argv[4] == "sep"
lm = load_model()
c, params = lm.config, lm.params
docs = D.load_documents(None, "calibration")
seqs = D.pack_tokens(docs, lm.tokenizer, D.eos_token_id(c, lm.tokenizer), 512, TOKENS, "cal")
valid = np.ones(seqs.shape, bool)
model = build_model(c)
pts = list(GROUP_HIST.values())  # q_in, o_in, ffn_in, down_in
group_of = {p: g for g, p in GROUP_HIST.items()}
taps = jax.jit(
    lambda p, t, v: {
        (i, q): tap(dense_taps(model, p, t, v), i, q) for i in range(c.num_layers) for q in pts
    }
)(params, jnp.asarray(seqs), jnp.asarray(valid))
norms = input_row_norms(c, params, pts)


def row_norms(mod, proj):
    return np.stack(
        [
            np.linalg.norm(np.asarray(params[f"layers_{i}"][mod][proj]["kernel"], np.float32), axis=1)
            for i in range(c.num_layers)
        ]
    )


xs = collect_block_inputs(c, params, seqs, valid)
err_fn = make_block_error_fn(c)
widths = model_widths(c)
# a candidate: point -> (norm table, exponent); "n" the group norms, "ref" the reference's
if REF:
    ref_norms = {"q_in": row_norms("self_attn", "k_proj"), "ffn_in": row_norms("mlp", "gate_proj")}
    tables = {"n": norms, "ref": {**norms, **ref_norms}}
    teal_ = {p: ("n", 0.0) for p in pts}
    cands = {
        "teal": teal_,
        "wina": {p: ("n", 1.0) for p in pts},
        "ref": {**teal_, "q_in": ("ref", 1.0), "ffn_in": ("ref", 1.0)},
        "ref_od": {"q_in": ("ref", 1.0), "ffn_in": ("ref", 1.0), "o_in": ("n", 1.0), "down_in": ("n", 1.0)},
        "k_only": {**teal_, "q_in": ("ref", 1.0)},
        "gate_only": {**teal_, "ffn_in": ("ref", 1.0)},
        "od_only": {**teal_, "o_in": ("n", 1.0), "down_in": ("n", 1.0)},
    }
elif SEP:
    q_n = row_norms("self_attn", "q_proj")
    kv_n = np.sqrt(row_norms("self_attn", "k_proj") ** 2 + row_norms("self_attn", "v_proj") ** 2)
    tables = {"n": norms, "q": {"q_in": q_n}, "kv": {"q_in": kv_n}}
    teal_ = {p: ("n", 0.0) for p in pts}
    sep_ = {"q_in": ("q", 1.0), "kv_in": ("kv", 1.0)}
    cands = {
        "teal": teal_,
        "wina": {p: ("n", 1.0) for p in pts},
        "sep": {**{p: ("n", 1.0) for p in pts}, **sep_},
        "sep_qkv": {**teal_, **sep_},
        "sep_od": {**teal_, **sep_, "o_in": ("n", 1.0), "down_in": ("n", 1.0)},
    }
else:
    tables = {"n": norms}
    cands = {"teal": {p: ("n", 0.0) for p in pts}, "wina": {p: ("n", 1.0) for p in pts}}
    for p in pts:
        cands[f"wina_{group_of[p]}"] = {q: ("n", float(q == p)) for q in pts}
    for a in (0.5, 2.0):
        cands[f"alpha_{a:g}"] = {p: ("n", a) for p in pts}
t0 = time.time()
layers = []
for i in range(c.num_layers):
    ths = []
    for alpha in cands.values():
        th = {}
        for p in [*pts, "kv_in"] if "kv_in" in alpha else pts:
            tap_p = "q_in" if p == "kv_in" else p  # k|v read the q/k/v input
            x = np.abs(np.asarray(taps[(i, tap_p)], np.float64)).reshape(-1, widths[tap_p])
            table, a = alpha[p]
            n = tables[table][tap_p][i].astype(np.float64) ** a
            th[p] = (np.quantile(x * n, S) / n).astype(np.float32)
        th.setdefault("kv_in", th["q_in"])
        th["gate"] = np.zeros(widths["gate"], np.float32)
        ths.append(th)
    stack = {p: jnp.stack([jnp.asarray(t[p]) for t in ths]) for p in widths}
    e = np.asarray(err_fn(params[f"layers_{i}"], jnp.asarray(xs[i]), jnp.asarray(valid), stack))
    layers.append(
        {
            "layer": i,
            "errors": {k: float(v) for k, v in zip(cands, e)},
            "row_norm_cv": {
                group_of[p]: float(norms[p][i].std() / norms[p][i].mean()) for p in pts
            },
        }
    )
    print(i, {k: round(float(v), 3) for k, v in zip(cands, e)}, flush=True)
total = {k: sum(r["errors"][k] for r in layers) for k in cands}
wins = sum(r["errors"]["wina"] < r["errors"]["teal"] for r in layers)
result = {
    "command": " ".join(["python", "block_errors.py", *sys.argv[1:]]),
    "model_source": str(lm.source),
    "jax_version": jax.__version__,
    "sparsity_per_group": S,
    "tokens": int(valid.sum()),
    "text": "calibration split of the built-in corpus, first sequences",
    "candidates": cands,
    "total_error": total,
    "layers_where_wina_beats_teal": wins,
    "layers": layers,
    "seconds": round(time.time() - t0, 1),
}
with open(out_path + ".tmp", "w") as f:
    json.dump(result, f, indent=1)
import os  # noqa: E402

os.replace(out_path + ".tmp", out_path)
print(json.dumps(total, indent=1), "wina < teal in", wins, "of", c.num_layers, "layers")
