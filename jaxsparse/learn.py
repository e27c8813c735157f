"""Learned thresholds: CHESS or TEAL thresholds refined with optax (`jaxsparse learn`).

The model's weights are frozen; the trainable parameters are the log-thresholds
`theta = log t`, one per channel, of each point the method sparsifies (chess: `gate`;
teal: `q_in`, `kv_in`, `o_in`, `ffn_in`, `down_in`), initialized from a calibrated state
(`--init DIR`, or calibrated on the fly on the same data).

Loss, per layer and summed over layers (every layer is trained on the *dense* model's
input to it, so the layers are independent and one jit, vmapped over the layer axis,
trains them all):

    err_l = ||f_l(x; t) - f_l(x; 0)||^2 / ||f_l(x; 0)||^2
    loss  = sum_l err_l + lambda * sum_{l,p} (s_{l,p} - S)^2

where `f_l` is the layer's FFN (chess: the model's own SwiGLU/ReLU-FFN module on the dense
FFN input, any token subset) or its whole block (teal: the model's block on the dense
residual, whole sequences), and `s_{l,p}` is the fraction of zeroed entries of point `p`.
The mask is straight-through (`rules.relaxed_sparsify`): the forward pass applies the hard
mask used at inference, the backward pass the gradient of `sigmoid((|x| - t) / tau)` with
`tau = tau_rel * t`, `tau_rel` annealed geometrically from `--tau-start` to `--tau-end`.
Optimizer: Adam on `theta`. Minibatches of `--batch-tokens` tokens are drawn with a JAX
PRNG key carried in the training state.

Checkpoints (`--save-every K`, in `--checkpoint-dir`, default `<out>.ckpt`): `theta`, the
optimizer state, the step and the PRNG key, as an orbax tree per step plus `meta.json`
(method, sparsity, model, settings). `--resume` continues from the latest one; since the
data, the schedule and the key all follow from the checkpoint, the result is bitwise that
of an uninterrupted run (tested). A checkpoint of another method, sparsity, model or data
is refused.

At the end, a closed-form rescale makes the hard sparsity exactly `S` on the training
tokens: per layer and point, all thresholds are multiplied by `c = quantile_S(|x| / t)`
over tokens and channels (the relative thresholds the training found are kept). The
result is a plain threshold `SparsityState` (method `chess-learned` / `teal-learned`),
which `generate`, `eval` and `sweep` take like any other.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from jaxsparse.training import LearnError, TrainLoop, TrainSettings, adam_step

POINTS = {"chess": ("gate",), "teal": ("q_in", "kv_in", "o_in", "ffn_in", "down_in")}
DEFAULTS = {
    "steps": 300,
    "lr": 0.02,
    "penalty": 100.0,
    "tau_start": 0.3,
    "tau_end": 0.03,
    "tokens": 8192,
    "seq_len": 512,
    "teal_seq_len": 128,
    "batch_tokens": 512,
    "save_every": 50,
    "seed": 0,
    "batch_size": 8,
}


@dataclasses.dataclass(frozen=True)
class LearnSettings(TrainSettings):
    method: str
    sparsity: float
    steps: int = DEFAULTS["steps"]
    lr: float = DEFAULTS["lr"]
    penalty: float = DEFAULTS["penalty"]
    tau_start: float = DEFAULTS["tau_start"]
    tau_end: float = DEFAULTS["tau_end"]
    batch_tokens: int = DEFAULTS["batch_tokens"]
    seed: int = DEFAULTS["seed"]


# ------------------------------------------------------------------ the training data


def dense_inputs(
    config, params, seqs_NxT: np.ndarray, method: str, batch_size: int = DEFAULTS["batch_size"]
) -> dict[str, np.ndarray]:
    """The dense model's input to each layer's trained part, and its dense output.

    chess: `x` [L, N, d], the FFN input of every token (rows flattened); teal: `x`
    [L, R, T, d], the residual entering each block, per sequence. `y` has the same shape
    (the dense FFN / block output).
    """
    import jax
    import jax.numpy as jnp

    from jaxsparse.measure import dense_taps, tap
    from jaxsparse.models import build_model

    model = build_model(config)
    L = config.num_layers
    ffn_only = method == "chess"

    @jax.jit
    def run(params, tokens, valid):
        t = dense_taps(model, params, tokens, valid)
        return jnp.stack([tap(t, i, "ffn_in" if ffn_only else "block_in") for i in range(L)])

    xs = []
    for start in range(0, len(seqs_NxT), batch_size):
        rows = seqs_NxT[start : start + batch_size]
        x = np.asarray(run(params, jnp.asarray(rows), jnp.ones(rows.shape, bool)))
        xs.append(x.reshape(L, -1, x.shape[-1]) if ffn_only else x)
    x = np.concatenate(xs, 1).astype(np.float32)
    fns = _layer_fns(config, method)
    stacked = stack_layer_params(params, config)
    apply = jax.jit(jax.vmap(lambda lp, xx: fns(lp, xx, None)[0]))
    chunk = 4096 if ffn_only else 8
    y = np.concatenate(
        [
            np.asarray(apply(stacked, jnp.asarray(x[:, i : i + chunk])))
            for i in range(0, x.shape[1], chunk)
        ],
        1,
    )
    return {"x": x, "y": y}


# In the stacked layer params of a model whose layers differ (Gemma 3): which are sliding.
SLIDING_FLAG = "layer_is_sliding"


def stack_layer_params(params: dict, config) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxsparse.config import SLIDING

    layers = [params[f"layers_{i}"] for i in range(config.num_layers)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *layers)
    if len(set(config.layer_types)) > 1:
        stacked[SLIDING_FLAG] = jnp.asarray([t == SLIDING for t in config.layer_types])
    return stacked


def _layer_fns(config, method: str):
    """`f(layer_params, x, thresholds) -> (y, taps)` for one layer: the trained part."""
    import jax
    import jax.numpy as jnp

    from jaxsparse.config import FULL, SLIDING
    from jaxsparse.models.layers import rope_cos_sin
    from jaxsparse.models.llama import LlamaBlock, SwiGLU
    from jaxsparse.models.opt import OPTBlock, ReluFFN

    opt = config.family == "opt"
    if method == "chess":
        ffn = (ReluFFN if opt else SwiGLU)(config)

        def f(lp, x_NxD, th):
            y, v = ffn.apply({"params": lp["mlp"]}, x_NxD[None], th, mutable=["taps"])
            return y[0], v["taps"]

        return f
    kinds = sorted(set(config.layer_types)) or [FULL]
    blocks = {k: OPTBlock(config) if opt else LlamaBlock(config, layer_type=k) for k in kinds}

    def run(kind, lp, x_RxTxD, th):
        r, t = x_RxTxD.shape[:2]
        pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (r, t))
        rope = None if opt else rope_cos_sin(config, pos, kind)
        (y, _), v = blocks[kind].apply(
            {"params": lp}, x_RxTxD, pos, pos, rope, None, 0, th, mutable=["taps"]
        )
        return y, v["taps"]

    def g(lp, x_RxTxD, th):
        if len(kinds) == 1:
            return run(kinds[0], lp, x_RxTxD, th)
        # Gemma 3 (vmapped over layers of both kinds): both blocks, each layer keeps its own.
        lp = dict(lp)
        sliding = lp.pop(SLIDING_FLAG)
        return jax.tree.map(
            lambda a, b: jnp.where(sliding, a, b),
            run(SLIDING, lp, x_RxTxD, th),
            run(FULL, lp, x_RxTxD, th),
        )

    return g


def _tap(taps: dict, point: str):
    """A point's raw activation from the taps of an FFN (root level) or a whole block."""
    from jaxsparse.measure import TAP_PATHS

    sub, name = TAP_PATHS[point]
    return taps[sub][name][0] if sub in taps else taps[name][0]


# ------------------------------------------------------------------ training


def init_theta(state, method: str) -> dict[str, np.ndarray]:
    """Stacked log-thresholds `{point: [L, width]}` from a calibrated state."""
    L = state.num_layers
    return {
        p: np.log(
            np.maximum(np.stack([state.thresholds[f"layers_{i}"][p] for i in range(L)]), 1e-8)
        ).astype(np.float32)
        for p in POINTS[method]
    }


class Trainer(TrainLoop):
    """The jit-compiled training step (the loop and checkpoints: `TrainLoop`) and the
    rescale."""

    postfix = (("loss", ".4f"), ("err", ".4f"), ("sparsity", ".3f"))

    def __init__(self, config, params, data: dict[str, np.ndarray], settings: LearnSettings):
        import jax
        import jax.numpy as jnp
        import optax

        from jaxsparse.rules import straight_through_mask

        self.config, self.settings = config, settings
        self.method = settings.method
        self.desc = f"learn {self.method}"
        self.points = POINTS[self.method]
        self.opt = optax.adam(settings.lr)
        self.stacked = stack_layer_params(params, config)
        self.x, self.y = jnp.asarray(data["x"]), jnp.asarray(data["y"])
        self.fn = _layer_fns(config, self.method)
        ffn_only = self.method == "chess"
        n = self.x.shape[1]
        per = 1 if ffn_only else self.x.shape[2]
        self.batch = max(1, min(n, settings.batch_tokens // per))
        s_target = settings.sparsity
        points, fn, opt = self.points, self.fn, self.opt

        # The weights and the data are arguments of the jitted functions (closed over,
        # XLA would embed them as constants).
        def layer_loss(lp, theta_l, x, y, tau):
            th = {p: jnp.exp(theta_l[p]) for p in points}
            th["relax_tau"] = tau
            y_s, taps = fn(lp, x, th)
            err = jnp.sum(jnp.square(y_s.astype(jnp.float32) - y)) / jnp.maximum(
                jnp.sum(jnp.square(y)), 1e-30
            )
            sp = {}
            for p in points:
                raw = _tap(taps, p)
                t = th[p]
                keep = straight_through_mask(raw, t, jax.lax.stop_gradient(tau * t) + 1e-20)
                sp[p] = 1.0 - jnp.mean(keep)
            pen = sum(jnp.square(sp[p] - s_target) for p in points)
            return err + settings.penalty * pen, (err, jnp.stack([sp[p] for p in points]))

        def loss_fn(theta, stacked, x, y, tau):
            tot, (err, sp) = jax.vmap(layer_loss, in_axes=(0, 0, 0, 0, None))(
                stacked, theta, x, y, tau
            )
            return jnp.sum(tot), (jnp.mean(err), jnp.mean(sp))

        step = adam_step(
            loss_fn,
            opt,
            n,
            self.batch,
            lambda idx, stacked, x_all, y_all: (stacked, x_all[:, idx], y_all[:, idx]),
            lambda loss, aux: {"loss": loss, "err": aux[0], "sparsity": aux[1]},
        )
        self._step = jax.jit(step)
        self._full_loss = jax.jit(lambda theta, tau, st, x, y: loss_fn(theta, st, x, y, tau)[0])

        def hard_eval(theta, stacked, x, y):
            def one(lp, th_l, xx, yy):
                th = {p: jnp.exp(th_l[p]) for p in points}
                y_s, taps = fn(lp, xx, th)
                err = jnp.sum(jnp.square(y_s.astype(jnp.float32) - yy)) / jnp.maximum(
                    jnp.sum(jnp.square(yy)), 1e-30
                )
                ratios = {p: jnp.abs(_tap(taps, p)).astype(jnp.float32) / th[p] for p in points}
                return err, ratios

            return jax.vmap(one)(stacked, theta, x, y)

        self._hard_eval = jax.jit(hard_eval)

    def full_loss(self, theta, tau: float):
        """The training loss over all the training tokens at temperature `tau`."""
        import jax.numpy as jnp

        return self._full_loss(theta, jnp.float32(tau), self.stacked, self.x, self.y)

    def init(self, theta0: dict[str, np.ndarray]) -> dict:
        import jax.numpy as jnp

        return super().init({p: jnp.asarray(v) for p, v in theta0.items()})

    def step_args(self) -> tuple:
        return (self.stacked, self.x, self.y)

    def hard_error(self, theta) -> tuple[float, float]:
        """(mean relative output error, mean hard sparsity) of thresholds `exp(theta)` on
        all the training tokens, as inference applies them."""
        chunk = 4096 if self.method == "chess" else 8
        errs, zs = [], []
        for i in range(0, self.x.shape[1], chunk):
            e, r = self._hard_eval(
                theta, self.stacked, self.x[:, i : i + chunk], self.y[:, i : i + chunk]
            )
            errs.append(np.asarray(e))
            zs.append(np.mean([np.mean(np.asarray(r[p]) < 1.0) for p in self.points]))
        return float(np.mean(errs)), float(np.mean(zs))

    def finalize(self, theta) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Rescale (see the module docstring): `{point: [L, width]}` thresholds and info."""
        chunk = 4096 if self.method == "chess" else 8
        errs, ratios = [], {p: [] for p in self.points}
        for i in range(0, self.x.shape[1], chunk):
            e, r = self._hard_eval(
                theta, self.stacked, self.x[:, i : i + chunk], self.y[:, i : i + chunk]
            )
            errs.append(np.asarray(e))
            for p in self.points:
                rr = np.asarray(r[p])
                ratios[p].append(rr.reshape(rr.shape[0], -1))
        s = self.settings.sparsity
        out, factors, before = {}, {}, {}
        for p in self.points:
            rr = np.concatenate(ratios[p], 1)  # [L, tokens * width]
            before[p] = [float(np.mean(row < 1.0)) for row in rr]
            c = np.array(
                [np.quantile(row, s, method="inverted_cdf") if s > 0 else 0.0 for row in rr],
                np.float64,
            )
            c = np.where(np.isfinite(c) & (c > 0), c, 1.0) if s > 0 else np.zeros_like(c)
            t = np.exp(np.asarray(theta[p], np.float64)) * c[:, None]
            out[p] = np.minimum(t, np.finfo(np.float32).max).astype(np.float32)
            factors[p] = c.tolist()
        info = {
            "rescale_factors": factors,
            "hard_sparsity_before_rescale": before,
            "train_err_before_rescale": float(np.mean(np.concatenate(errs, -1))),
        }
        return out, info


# ------------------------------------------------------------------ the whole job


def learn(
    config,
    params,
    seqs_NxT: np.ndarray,
    init_state,
    settings: LearnSettings,
    ckpt_dir: Path | None = None,
    save_every: int = 0,
    resume: bool = False,
    data_key: dict | None = None,
    provenance: dict | None = None,
    progress: bool = True,
    stop_at: int | None = None,
):
    """Learns thresholds from `init_state` on the token rows `seqs_NxT`; returns
    `(SparsityState, info)`. With `stop_at`, stops after that step without finishing
    (returns `(None, training state)`; for tests of interruption)."""
    from jaxsparse.methods import check_sparsity
    from jaxsparse.sparsity import make_state

    if settings.method not in POINTS:
        raise LearnError(f"--method {settings.method!r}: learn supports {sorted(POINTS)}")
    check_sparsity(settings.sparsity)
    if init_state.method != settings.method:
        raise LearnError(
            f"--init holds a {init_state.method!r} state; --method "
            f"{settings.method} starts from a {settings.method!r} state"
        )
    init_state.check_model(config, "--init state")
    data_key = data_key or {}
    t0 = time.time()
    data = dense_inputs(config, params, seqs_NxT, settings.method)
    trainer = Trainer(config, params, data, settings)
    ts = trainer.init(init_theta(init_state, settings.method))
    _, ts, done = trainer.train(
        ts, config, ckpt_dir, resume, save_every, data_key, progress, stop_at
    )
    if not done:
        return None, ts
    thresholds, info = trainer.finalize(ts["theta"])
    values = {
        f"layers_{i}": {p: thresholds[p][i] for p in trainer.points}
        for i in range(config.num_layers)
    }
    details = {
        "init_method": init_state.method,
        "init_provenance": init_state.meta.provenance,
        "settings": dataclasses.asdict(settings),
        "points": list(trainer.points),
        "final_step": ts["step"],
        "train_tokens": int(seqs_NxT.size),
        "trace": trainer.trace[-30:],
        **info,
        "seconds": round(time.time() - t0, 1),
    }
    state = make_state(
        config, f"{settings.method}-learned", settings.sparsity, values, provenance, details
    )
    return state, {"training_state": ts, **details}
