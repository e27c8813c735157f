"""Deja Vu predictors: training data from the dense model, low-rank predictors trained
with optax, their held-out report, and the `dejavu` sparsity state (`train-predictors`).

What a predictor sees and predicts (lookahead, docs/design.md "Methods"): for layer
`l`, the residual entering block `l - 1` (layer 0: its own input), divided by its RMS;
it predicts which FFN neurons of layer `l` matter (labels: the top `ffn_label_k` of
`abs(g_i * u_i)` of the dense model, per token) and which attention heads matter (labels:
the top `head_label_k` heads by the norm of their attention output). Each layer has two
predictors `d -> r -> m` and `d -> r_h -> H` (`silu` between; `jaxsparse.rules`), all
layers trained together in one jit (vmapped over the layer axis) with AdamW on
class-weighted BCE (positives weighted `(width - k) / k`), early-stopped per layer on
held-out recall (the best evaluation of each layer is kept; training stops when no layer
improved for `patience` evaluations).

At inference (`jaxsparse.models.predictor.predicted_masks`) a layer keeps its top `ffn_k` predicted neurons
and top `head_k` heads. The report gives, on test tokens (sequences used neither for
training nor for early stopping: three disjoint splits), per layer and averaged: `ffn_recall` (fraction of the labelled neurons kept),
`ffn_precision` (fraction of the kept neurons that are labelled), `ffn_mass_recall` (the
share of `sum_i abs(g_i u_i)` the kept neurons carry), `head_recall`, `head_precision`,
and `predicted_sparsity` (`1 - ffn_k / m`, exact for a fixed top-k).
This module holds no model code; the hooks that apply the masks are in `jaxsparse.models`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

DEFAULTS = {
    "tokens": 8192,
    "seq_len": 512,
    "batch_size": 8,
    "ffn_rank": 128,
    "head_rank": 32,
    "steps": 600,
    "batch_tokens": 1024,
    "lr": 3e-3,
    "weight_decay": 1e-4,
    "eval_every": 50,
    "patience": 4,
    "holdout": 0.15,
    "test_holdout": 0.15,
    "seed": 0,
}


class PredictorError(ValueError):
    """Bad predictor settings (a rank or a k that does not fit the model)."""


def check_settings(
    config,
    ffn_rank: int,
    head_rank: int,
    ffn_k: int,
    head_k: int,
    ffn_label_k: int,
    head_label_k: int,
) -> None:
    d, m, heads = config.hidden_size, config.intermediate_size, config.num_heads
    for name, r in (("--ffn-rank", ffn_rank), ("--head-rank", head_rank)):
        if not 1 <= r <= d:
            raise PredictorError(
                f"{name} {r}: a low-rank predictor needs a rank in [1, {d}] "
                f"(the model width, hidden_size={d})"
            )
    for name, k, width, what in (
        ("--ffn-k", ffn_k, m, "FFN neurons"),
        ("--ffn-label-k", ffn_label_k, m, "FFN neurons"),
        ("--head-k", head_k, heads, "attention heads"),
        ("--head-label-k", head_label_k, heads, "attention heads"),
    ):
        if not 1 <= k <= width:
            raise PredictorError(
                f"{name} {k}: outside [1, {width}] (the model has {width} {what} per layer)"
            )


def default_ks(config) -> dict[str, int]:
    """Operating point by default: half the neurons kept, a quarter labelled; all heads
    kept, the top half labelled (so head_recall is 1 unless --head-k is lowered)."""
    m, heads = config.intermediate_size, config.num_heads
    return {
        "ffn_k": m // 2,
        "ffn_label_k": max(1, m // 4),
        "head_k": heads,
        "head_label_k": max(1, heads // 2),
    }


# ------------------------------------------------------------------ training data


def gather(
    config,
    params,
    seqs_NxT: np.ndarray,
    batch_size: int = DEFAULTS["batch_size"],
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Dense forward passes (jit) over token rows; returns host arrays over all tokens:
    `x` [L, N, d] float32 (the lookahead input of each layer), `ffn_importance` [L, N, m]
    float16 (`abs(g * u)`), `head_norm` [L, N, H] float32 and `seq` [N] (row index)."""
    import jax
    import jax.numpy as jnp
    from tqdm import tqdm

    from jaxsparse.measure import dense_taps, tap
    from jaxsparse.models import build_model

    if config.family == "opt":
        raise PredictorError(
            "train-predictors supports SwiGLU models (the Llama family); "
            "OPT's ReLU zeros need no predictor labels from g * u"
        )
    model = build_model(config)
    L = config.num_layers

    @jax.jit
    def run(params, tokens, valid):
        t = dense_taps(model, params, tokens, valid)
        block_in = [tap(t, i, "block_in") for i in range(L)]
        x = jnp.stack([block_in[max(i - 1, 0)] for i in range(L)])
        imp = jnp.stack(
            [
                jnp.abs(tap(t, i, "gate").astype(jnp.float32) * tap(t, i, "up").astype(jnp.float32))
                for i in range(L)
            ]
        )
        hn = jnp.stack(
            [jnp.linalg.norm(tap(t, i, "head_out").astype(jnp.float32), axis=-1) for i in range(L)]
        )
        return x.astype(jnp.float32), imp.astype(jnp.float16), hn

    from jaxsparse.sharding import rows_per_batch

    xs, imps, hns = [], [], []
    n = len(seqs_NxT)
    batch_size = rows_per_batch(n, batch_size)
    for start in tqdm(
        range(0, n, batch_size), desc="predictor data", unit="batch", disable=not progress
    ):
        rows = seqs_NxT[start : start + batch_size]
        k = len(rows)
        if k < batch_size:  # pad to one compiled shape
            rows = np.concatenate([rows, np.zeros((batch_size - k,) + rows.shape[1:], rows.dtype)])
        x, imp, hn = run(params, jnp.asarray(rows), jnp.ones(rows.shape, bool))
        for acc, a in ((xs, x), (imps, imp), (hns, hn)):
            acc.append(np.asarray(a)[:, :k].reshape(L, k * rows.shape[1], -1))
    seq = np.repeat(np.arange(n), seqs_NxT.shape[1])
    return {
        "x": np.concatenate(xs, 1),
        "ffn_importance": np.concatenate(imps, 1),
        "head_norm": np.concatenate(hns, 1),
        "seq": seq,
    }


# ------------------------------------------------------------------ predictors


def init_predictors(config, ffn_rank: int, head_rank: int, seed: int = 0) -> dict:
    """Stacked predictor weights `{key: [L, ...]}` (float32)."""
    import jax
    import jax.numpy as jnp

    L, d, m, H = (config.num_layers, config.hidden_size, config.intermediate_size, config.num_heads)
    ks = jax.random.split(jax.random.key(seed), 4)
    n = jax.random.normal
    return {
        "ffn_w1": n(ks[0], (L, d, ffn_rank)) / np.sqrt(d),
        "ffn_b1": jnp.zeros((L, ffn_rank)),
        "ffn_w2": n(ks[1], (L, ffn_rank, m)) / np.sqrt(ffn_rank),
        "ffn_b2": jnp.zeros((L, m)),
        "head_w1": n(ks[2], (L, d, head_rank)) / np.sqrt(d),
        "head_b1": jnp.zeros((L, head_rank)),
        "head_w2": n(ks[3], (L, head_rank, H)) / np.sqrt(head_rank),
        "head_b2": jnp.zeros((L, H)),
    }


def _weighted_bce(logits, labels, k: int):
    """Mean BCE with positives weighted `(width - k) / k` (the classes balanced)."""
    import jax

    width = logits.shape[-1]
    pos_w = (width - k) / k
    y = labels.astype(logits.dtype)
    lp, ln = jax.nn.log_sigmoid(logits), jax.nn.log_sigmoid(-logits)
    return -(pos_w * y * lp + (1 - y) * ln).mean() / (1 + pos_w) * 2


def _bulk_topk(scores, k):
    """The top-k mask of many tokens' neuron scores at once (labels, held-out metrics): on a
    CPU by counting (`rules.topk_mask(select="count")`, one bit per pass), 6-20x faster
    there than XLA's sort of every row; its extra compile time (about 1.3 s a call) is paid
    once per training run. Elsewhere `topk_mask`'s own choice."""
    import jax

    from jaxsparse.rules import RADIX_MIN_WIDTH, topk_mask

    wide = scores.shape[-1] >= RADIX_MIN_WIDTH
    return topk_mask(
        scores, k, select="count" if wide and jax.default_backend() == "cpu" else "auto"
    )


def _metrics(w: dict, x, imp, hn, ks: dict):
    """Per-layer (unstacked `w`) held-out sums: hits and counts for recall/precision."""
    import jax.numpy as jnp

    from jaxsparse.models.predictor import predictor_logits
    from jaxsparse.rules import topk_mask

    imp = imp.astype(jnp.float32)
    ffn_lab = _bulk_topk(imp, ks["ffn_label_k"])
    head_lab = topk_mask(hn, ks["head_label_k"])
    ffn_pred = _bulk_topk(predictor_logits(w, x, "ffn"), ks["ffn_k"])
    head_pred = topk_mask(predictor_logits(w, x, "head"), ks["head_k"])
    f = lambda a: jnp.sum(a.astype(jnp.float32))
    return {
        "ffn_hits": f(ffn_lab & ffn_pred),
        "ffn_labels": f(ffn_lab),
        "ffn_kept": f(ffn_pred),
        "ffn_mass_kept": jnp.sum(imp * ffn_pred),
        "ffn_mass": jnp.sum(imp),
        "head_hits": f(head_lab & head_pred),
        "head_labels": f(head_lab),
        "head_kept": f(head_pred),
    }


def _report_from_sums(sums: dict, config, ks: dict) -> dict[str, Any]:
    L = config.num_layers
    per_layer = {}
    for i in range(L):
        s = {k: float(v[i]) for k, v in sums.items()}
        per_layer[f"layers_{i}"] = {
            "ffn_recall": s["ffn_hits"] / max(s["ffn_labels"], 1),
            "ffn_precision": s["ffn_hits"] / max(s["ffn_kept"], 1),
            "ffn_mass_recall": s["ffn_mass_kept"] / max(s["ffn_mass"], 1e-30),
            "head_recall": s["head_hits"] / max(s["head_labels"], 1),
            "head_precision": s["head_hits"] / max(s["head_kept"], 1),
            "predicted_sparsity": 1.0 - ks["ffn_k"] / config.intermediate_size,
            "predicted_head_sparsity": 1.0 - ks["head_k"] / config.num_heads,
        }
    keys = next(iter(per_layer.values())).keys()
    mean = {k: float(np.mean([v[k] for v in per_layer.values()])) for k in keys}
    return {"mean": mean, "per_layer": per_layer}


def train_predictors(
    config,
    data: dict[str, np.ndarray],
    ks: dict[str, int],
    ffn_rank: int = DEFAULTS["ffn_rank"],
    head_rank: int = DEFAULTS["head_rank"],
    steps: int = DEFAULTS["steps"],
    batch_tokens: int = DEFAULTS["batch_tokens"],
    lr: float = DEFAULTS["lr"],
    weight_decay: float = DEFAULTS["weight_decay"],
    eval_every: int = DEFAULTS["eval_every"],
    patience: int = DEFAULTS["patience"],
    holdout: float = DEFAULTS["holdout"],
    seed: int = DEFAULTS["seed"],
    progress: bool = True,
    test_holdout: float = DEFAULTS["test_holdout"],
) -> tuple[dict, dict[str, Any]]:
    """Trains every layer's predictors on `data` (from `gather`); returns the stacked best
    weights (host) and the report (with the training trace).

    The sequences are split three ways, in order: training, then `holdout` of them for
    early stopping (validation), then the last `test_holdout` for the report. The
    report's `mean` and `per_layer` are measured on the test sequences, which neither
    training nor early stopping saw; `validation` holds the early-stopping split's means.
    """
    import jax
    import jax.numpy as jnp
    import optax
    from tqdm import tqdm

    from jaxsparse.models.predictor import predictor_logits
    from jaxsparse.rules import topk_mask

    check_settings(config, ffn_rank, head_rank, **ks)
    seqs = np.unique(data["seq"])
    n_hold = max(1, round(len(seqs) * holdout))
    n_test = max(1, round(len(seqs) * test_holdout))
    if len(seqs) - n_hold - n_test < 1:
        raise PredictorError(
            f"{len(seqs)} sequence(s): need at least 3 (training, early "
            f"stopping, test; raise --tokens)"
        )
    test_seqs = seqs[len(seqs) - n_test :]
    val_seqs = seqs[len(seqs) - n_test - n_hold : len(seqs) - n_test]
    held = np.isin(data["seq"], val_seqs)
    tested = np.isin(data["seq"], test_seqs)
    tr_idx, ho_idx = np.flatnonzero(~held & ~tested), np.flatnonzero(held)
    te_idx = np.flatnonzero(tested)
    x_tr = jnp.asarray(data["x"][:, tr_idx])
    # labels once (a top-k per token is a sort: too costly to redo every step)
    label = jax.jit(
        lambda imp, hn: (
            _bulk_topk(imp.astype(jnp.float32), ks["ffn_label_k"]),
            topk_mask(hn, ks["head_label_k"]),
        )
    )
    labs = [
        label(
            jnp.asarray(data["ffn_importance"][:, tr_idx[i : i + 2048]]),
            jnp.asarray(data["head_norm"][:, tr_idx[i : i + 2048]]),
        )
        for i in range(0, len(tr_idx), 2048)
    ]
    ffn_lab_tr = jnp.concatenate([a for a, _ in labs], 1)
    head_lab_tr = jnp.concatenate([b for _, b in labs], 1)
    ho = (
        jnp.asarray(data["x"][:, ho_idx]),
        jnp.asarray(data["ffn_importance"][:, ho_idx]),
        jnp.asarray(data["head_norm"][:, ho_idx]),
    )
    n_tr = len(tr_idx)
    bt = min(batch_tokens, n_tr)

    params = init_predictors(config, ffn_rank, head_rank, seed)
    opt = optax.adamw(lr, weight_decay=weight_decay)
    opt_state = opt.init(params)
    kk = {k: int(v) for k, v in ks.items()}

    def layer_loss(w, x, ffn_lab, head_lab):
        return _weighted_bce(
            predictor_logits(w, x, "ffn"), ffn_lab, kk["ffn_label_k"]
        ) + _weighted_bce(predictor_logits(w, x, "head"), head_lab, kk["head_label_k"])

    def loss_fn(p, x, imp, hn):
        return jnp.sum(jax.vmap(layer_loss)(p, x, imp, hn))

    @jax.jit
    def step(p, s, key, x_tr, ffn_lab_tr, head_lab_tr):  # data as arguments, not constants
        idx = jax.random.choice(key, n_tr, (bt,), replace=False)
        x, fl, hl = x_tr[:, idx], ffn_lab_tr[:, idx], head_lab_tr[:, idx]
        loss, g = jax.value_and_grad(loss_fn)(p, x, fl, hl)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s, loss

    ev = jax.jit(lambda p, ho: jax.vmap(lambda w, x, i, h: _metrics(w, x, i, h, kk))(p, *ho))

    def evaluate(p):
        return ev(p, ho)

    def score(sums):  # per layer: the early-stopping criterion
        s = {k: np.asarray(v, np.float64) for k, v in sums.items()}
        return s["ffn_hits"] / np.maximum(s["ffn_labels"], 1) + s["head_hits"] / np.maximum(
            s["head_labels"], 1
        )

    best = jax.tree.map(np.asarray, params)
    best_sums = jax.tree.map(np.asarray, evaluate(params))
    best_score = score(best_sums)
    trace, stale = [], 0
    key = jax.random.key(seed + 1)
    bar = tqdm(range(1, steps + 1), desc="predictors", unit="step", disable=not progress)
    loss = float("nan")
    for it in bar:
        params, opt_state, loss = step(
            params, opt_state, jax.random.fold_in(key, it), x_tr, ffn_lab_tr, head_lab_tr
        )
        if it % eval_every == 0 or it == steps:
            sums = jax.tree.map(np.asarray, evaluate(params))
            sc = score(sums)
            better = sc > best_score
            if better.any():
                host = jax.tree.map(np.asarray, params)
                best = {
                    k: np.where(better.reshape((-1,) + (1,) * (v.ndim - 1)), host[k], v)
                    for k, v in best.items()
                }
                best_sums = {k: np.where(better, sums[k], v) for k, v in best_sums.items()}
                best_score = np.where(better, sc, best_score)
                stale = 0
            else:
                stale += 1
            rep = _report_from_sums(best_sums, config, kk)["mean"]
            trace.append(
                {
                    "step": it,
                    "loss": float(loss),
                    "ffn_recall": rep["ffn_recall"],
                    "head_recall": rep["head_recall"],
                    "layers_improved": int(better.sum()),
                }
            )
            bar.set_postfix(loss=f"{float(loss):.4f}", ffn_recall=f"{rep['ffn_recall']:.3f}")
            if stale >= patience:
                break
    validation = _report_from_sums(best_sums, config, kk)["mean"]
    report = heldout_report(
        config, best, {k: data[k][:, te_idx] for k in ("x", "ffn_importance", "head_norm")}, kk
    )
    report.update(
        {
            "validation": validation,
            "test_tokens": len(te_idx),
            "test_sequences": int(n_test),
            "split": "mean/per_layer: test sequences (not trained on, not used for early "
            "stopping); validation: the early-stopping sequences",
            "settings": {
                **kk,
                "ffn_rank": ffn_rank,
                "head_rank": head_rank,
                "steps_run": it,
                "max_steps": steps,
                "batch_tokens": bt,
                "lr": lr,
                "weight_decay": weight_decay,
                "eval_every": eval_every,
                "patience": patience,
                "seed": seed,
            },
            "train_tokens": int(n_tr),
            "heldout_tokens": len(ho_idx),
            "heldout_sequences": int(n_hold),
            "trace": trace,
        }
    )
    return best, report


def heldout_report(
    config, weights: dict, data: dict[str, np.ndarray], ks: dict[str, int]
) -> dict[str, Any]:
    """The report of stacked `weights` on all of `data` (e.g. other tokens, other k's)."""
    import jax
    import jax.numpy as jnp

    kk = {k: int(v) for k, v in ks.items()}
    w = {k: jnp.asarray(v) for k, v in weights.items() if not k.endswith("_k")}
    sums = jax.jit(jax.vmap(lambda w, x, i, h: _metrics(w, x, i, h, kk)))(
        w,
        jnp.asarray(data["x"]),
        jnp.asarray(data["ffn_importance"]),
        jnp.asarray(data["head_norm"]),
    )
    return _report_from_sums(jax.tree.map(np.asarray, sums), config, kk)


def dejavu_state(config, weights: dict, ffn_k: int, head_k: int, provenance=None, details=None):
    """The `dejavu` SparsityState: zero thresholds, per-layer predictors and k's."""
    from jaxsparse.sparsity import make_state

    m = config.intermediate_size
    preds = {}
    for i in range(config.num_layers):
        layer = {
            k: np.asarray(v[i], np.float32) for k, v in weights.items() if not k.endswith("_k")
        }
        layer["ffn_k"] = np.asarray(ffn_k, np.int32)
        layer["head_k"] = np.asarray(head_k, np.int32)
        preds[f"layers_{i}"] = layer
    state = make_state(
        config,
        "dejavu",
        1.0 - ffn_k / m,
        {},
        provenance,
        {**(details or {}), "ffn_k": ffn_k, "head_k": head_k},
    )
    out = state.replace(predictors=preds)
    out.check_model(config, "dejavu state")
    return out


def with_operating_point(state, ffn_k: int | None = None, head_k: int | None = None):
    """The same predictors with other k's (no retraining); target sparsity updated."""
    import dataclasses
    import json as _json

    from jaxsparse.sparsity import StateMeta

    fp = state.meta.model
    ffn_k = ffn_k or int(state.predictors["layers_0"]["ffn_k"])
    head_k = head_k or int(state.predictors["layers_0"]["head_k"])
    for name, k, width in (
        ("ffn_k", ffn_k, fp.intermediate_size),
        ("head_k", head_k, fp.num_heads),
    ):
        if not 1 <= k <= width:
            raise PredictorError(f"{name} {k}: outside [1, {width}]")
    preds = {
        layer: {**w, "ffn_k": np.asarray(ffn_k, np.int32), "head_k": np.asarray(head_k, np.int32)}
        for layer, w in state.predictors.items()
    }
    details = {**state.meta.details, "ffn_k": ffn_k, "head_k": head_k}
    meta = dataclasses.replace(
        state.meta,
        target_sparsity=1.0 - ffn_k / fp.intermediate_size,
        details_json=_json.dumps(details, sort_keys=True),
    )
    assert isinstance(meta, StateMeta)
    return state.replace(predictors=preds, meta=meta)
