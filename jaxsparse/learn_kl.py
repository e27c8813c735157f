"""Learned thresholds, end to end (`jaxsparse learn --objective kl --target-fraction F`).

The sparse model is run whole on real text and trained against the dense model's
next-token distribution, under one global budget: the fraction of the blocks' linear
weights read per token (`jaxsparse.sparsity.activated_params_fraction`). How that budget
is spread over layers and projections is learned, not fixed.

Parameters: for each trained point `p` (default: every point but `down_in`, see
`DEFAULT_POINTS`) and layer
`l`, log-threshold offsets `theta[p][l]` on top of calibrated base thresholds `b`:
`t = b * exp(theta)`. With `--granularity layer` (default) `theta[p]` is `[L, 1]`: one
scale per layer and projection, moving a calibrated per-channel profile (chess's
`Q / E|u_i|` on the gate, wina's `T / n_i` on the inputs) as a whole; with `channel`
it is `[L, width]`, one per channel. The base comes from `--init` states (for each point,
the first state with nonzero thresholds there), by default chess (gate) and wina (inputs)
calibrated on the training text.

Loss per step, on a minibatch of whole sequences:

    KL = mean_tokens sum_v p_dense(v) (log p_dense(v) - log p_sparse(v))
    F  = mean_l activated_params_fraction(density_l)
    loss = KL + lambda * (F - F_target)^2

`density_{l,p}` is the mean of the straight-through keep-mask `rules.straight_through_mask`
(hard in the forward pass, sigmoid gradient, temperature `tau_rel * t`, `tau_rel`
annealed geometrically from `--tau-start` to `--tau-end`), so `F` is the hard fraction of
the batch and differentiable in the thresholds. The model's masks are the same
straight-through masks (`rules.relaxed_sparsify`). Optimizer: Adam. Minibatches are drawn
with a JAX PRNG key held in the training state.

Before training and after it, one global factor `c` on every trained threshold is solved
(`jaxsparse.budget.solve_scale`) so that the hard activated-params fraction measured on
the training text (`jaxsparse.evaluate`'s forward) is `F_target` within `--fraction-tol`:
training starts on budget and the result meets it. Only the allocation comes from training.

Checkpoints and `--resume` are `jaxsparse.training`'s, as for `learn` (orbax: theta, optimizer state, step,
key; `meta.json` with the settings): a resumed run is bitwise an uninterrupted one.
The result is a threshold `SparsityState`, method `kl-learned` (the same compiled forward
as every threshold method serves it).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from jaxsparse.budget import BudgetError, FractionMeter, solve_scale
from jaxsparse.training import LearnError, TrainLoop, TrainSettings, adam_step

METHOD = "kl-learned"
ALL_POINTS = ("q_in", "kv_in", "o_in", "ffn_in", "gate", "down_in")
# down_in is left out by default: an entry the gate zeroes reaches down_in as an exact 0,
# below any down_in threshold, so down_in's straight-through mask (hard 0 there) blocks the
# gradient the gate's threshold would get from it (measured on a tiny model: the gate's
# gradient fell from 0.009 to 0.0001 with down_in trained too, against a finite
# difference of 0.012). The gate already skips down_proj's rows.
DEFAULT_POINTS = ("q_in", "kv_in", "o_in", "ffn_in", "gate")
DEFAULTS = {
    "steps": 200,
    "lr": 0.03,
    "penalty": 1000.0,
    "tau_start": 0.2,
    "tau_end": 0.05,
    "tokens": 8192,
    "seq_len": 128,
    "batch_seqs": 2,
    "save_every": 50,
    "seed": 0,
    "granularity": "layer",
    "fraction_tol": 1e-3,
    "init_gate_sparsity": 0.5,
    "init_input_sparsity": 0.1,
    "measure_tokens": 2048,
}


@dataclasses.dataclass(frozen=True)
class KLSettings(TrainSettings):
    target_fraction: float
    points: tuple[str, ...] = DEFAULT_POINTS
    granularity: str = DEFAULTS["granularity"]
    steps: int = DEFAULTS["steps"]
    lr: float = DEFAULTS["lr"]
    penalty: float = DEFAULTS["penalty"]
    tau_start: float = DEFAULTS["tau_start"]
    tau_end: float = DEFAULTS["tau_end"]
    batch_seqs: int = DEFAULTS["batch_seqs"]
    seed: int = DEFAULTS["seed"]
    method: str = "kl"

    def __post_init__(self):
        if not 0.0 < self.target_fraction <= 1.0:
            raise LearnError(
                f"--target-fraction {self.target_fraction}: expected a fraction "
                f"of the weights read in (0, 1], e.g. 0.75"
            )
        unknown = set(self.points) - set(ALL_POINTS)
        if unknown or not self.points:
            raise LearnError(
                f"--points {','.join(self.points)}: expected a subset of {','.join(ALL_POINTS)}"
            )
        if self.granularity not in ("layer", "channel"):
            raise LearnError(f"--granularity {self.granularity!r}: use layer or channel")
        if self.steps < 1 or self.batch_seqs < 1:
            raise LearnError("--steps and --batch-seqs must be positive")


# ------------------------------------------------------------------ base thresholds


def base_thresholds(config, init_states: list, points: tuple[str, ...]) -> dict[str, np.ndarray]:
    """`{point: [L, width]}` float32 from the first state with nonzero thresholds at each
    point; a point no state thresholds raises LearnError (pass a state that does)."""
    L = config.num_layers
    out = {}
    for p in points:
        for st in init_states:
            t = np.stack(
                [np.asarray(st.thresholds[f"layers_{i}"][p], np.float32) for i in range(L)]
            )
            if np.any(t > 0):
                out[p] = t
                break
        else:
            raise LearnError(
                f"no --init state thresholds point {p!r} (states: "
                f"{', '.join(s.method for s in init_states)}); add one that "
                f"does or leave {p} out of --points"
            )
    return out


def _log_base(base: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """log of the base thresholds; a zero channel (never zeroed) stays at -inf-like -80,
    a float32-max one (always zeroed) stays huge."""
    return {
        p: np.log(np.maximum(np.asarray(b, np.float64), 1e-35)).astype(np.float32)
        for p, b in base.items()
    }


def thresholds_for(config, log_base: dict, theta: dict, log_scale=0.0, tau=None) -> dict:
    """The model's `thresholds=` tree: `exp(log_base + theta + log_scale)` per trained point
    (jnp), with `relax_tau` when `tau` is given (training)."""
    import jax.numpy as jnp

    tree = {}
    for i in range(config.num_layers):
        layer = {
            p: jnp.exp(jnp.asarray(log_base[p][i]) + theta[p][i] + log_scale) for p in log_base
        }
        if tau is not None:
            layer["relax_tau"] = tau
        tree[f"layers_{i}"] = layer
    return tree


def host_thresholds(config, log_base: dict, theta: dict, log_scale: float = 0.0) -> dict:
    """`{layers_i: {point: float32 [width]}}` (numpy, float32-max capped)."""
    out = {}
    for i in range(config.num_layers):
        layer = {}
        for p, lb in log_base.items():
            t = np.exp(
                np.asarray(lb[i], np.float64) + np.asarray(theta[p][i], np.float64) + log_scale
            )
            layer[p] = np.minimum(t, np.finfo(np.float32).max).astype(np.float32)
        out[f"layers_{i}"] = layer
    return out


# ------------------------------------------------------------------ training


class KLTrainer(TrainLoop):
    """The jit-compiled end-to-end step (the loop and checkpoints: `TrainLoop`)."""

    desc = "learn kl"
    postfix = (("kl", ".4f"), ("fraction", ".4f"))

    def __init__(self, config, params, seqs_NxT: np.ndarray, log_base: dict, settings: KLSettings):
        import jax
        import jax.numpy as jnp
        import optax

        from jaxsparse.measure import tap
        from jaxsparse.models import build_model
        from jaxsparse.rules import straight_through_mask
        from jaxsparse.sparsity import activated_params_fraction

        self.config, self.settings = config, settings
        self.log_base = {p: np.asarray(v, np.float32) for p, v in log_base.items()}
        self.points = tuple(p for p in settings.points)
        self.opt = optax.adam(settings.lr)
        self.params = params
        self.seqs = jnp.asarray(seqs_NxT)
        n, T = seqs_NxT.shape
        self.batch = min(settings.batch_seqs, n)
        model = build_model(config)
        L = config.num_layers
        target, lam = settings.target_fraction, settings.penalty
        base_dev = {p: jnp.asarray(v) for p, v in self.log_base.items()}
        pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (self.batch, T))

        def loss_fn(theta, params, base, tokens, tau):
            th = thresholds_for(config, base, theta, 0.0, tau)
            (logits, _), v = model.apply(
                {"params": params}, tokens, pos, thresholds=th, mutable=["taps"]
            )
            dense, _ = model.apply({"params": params}, tokens, pos)
            logp_d = jax.nn.log_softmax(jax.lax.stop_gradient(dense).astype(jnp.float32), -1)
            logp_s = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
            kl = jnp.mean(jnp.sum(jnp.exp(logp_d) * (logp_d - logp_s), -1))
            taps = v["taps"]
            fracs = []
            for i in range(L):
                dens = {}
                for p in ALL_POINTS:
                    x = jax.lax.stop_gradient(tap(taps, i, p))
                    if p in th[f"layers_{i}"]:
                        t = th[f"layers_{i}"][p]
                        keep = straight_through_mask(x, t, jax.lax.stop_gradient(tau * t) + 1e-20)
                        dens[p] = jnp.mean(keep)
                    else:
                        dens[p] = jnp.mean((x != 0).astype(jnp.float32))
                fracs.append(activated_params_fraction(config, dens))
            frac = jnp.mean(jnp.stack(fracs))
            loss = kl + lam * jnp.square(frac - target)
            return loss, (kl, frac, jnp.stack(fracs))

        step = adam_step(
            loss_fn,
            self.opt,
            n,
            self.batch,
            lambda idx, params, base, seqs: (params, base, seqs[idx]),
            lambda loss, aux: {"loss": loss, "kl": aux[0], "fraction": aux[1]},
        )
        self._step = jax.jit(step)
        self._base = base_dev

        def hard_kl(theta, params, base, tokens, log_scale):
            th = thresholds_for(config, base, theta, log_scale)
            logits, _ = model.apply({"params": params}, tokens, pos, thresholds=th)
            dense, _ = model.apply({"params": params}, tokens, pos)
            logp_d = jax.nn.log_softmax(dense.astype(jnp.float32), -1)
            logp_s = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
            return jnp.mean(jnp.sum(jnp.exp(logp_d) * (logp_d - logp_s), -1))

        self._hard_kl = jax.jit(hard_kl)

    def zero_theta(self) -> dict:
        import jax.numpy as jnp

        L = self.config.num_layers
        return {
            p: jnp.zeros(
                (L, 1 if self.settings.granularity == "layer" else self.log_base[p].shape[1]),
                jnp.float32,
            )
            for p in self.points
        }

    def init(self, theta0: dict | None = None) -> dict:
        import jax.numpy as jnp

        theta = {p: jnp.asarray(v, jnp.float32) for p, v in (theta0 or self.zero_theta()).items()}
        return super().init(theta)

    def step_args(self) -> tuple:
        return (self.params, self._base, self.seqs)

    def hard_kl(self, theta, log_scale: float = 0.0, rows: int | None = None) -> float:
        """Mean KL(dense || sparse, hard masks) over the first `rows` training sequences."""
        import jax.numpy as jnp

        seqs = self.seqs[: rows or len(self.seqs)]
        vals = []
        for s in range(0, len(seqs) - self.batch + 1, self.batch):
            vals.append(
                float(
                    self._hard_kl(
                        theta,
                        self.params,
                        self._base,
                        seqs[s : s + self.batch],
                        jnp.float32(log_scale),
                    )
                )
            )
        return float(np.mean(vals))


def rescale_to_target(
    config, meter: FractionMeter, log_base: dict, theta: dict, target: float, tol: float
) -> tuple[float, float, list]:
    """Global `log c` putting the hard fraction on `meter`'s tokens at `target`."""
    host_theta = {p: np.asarray(v) for p, v in theta.items()}
    try:
        return solve_scale(
            lambda x: meter(host_thresholds(config, log_base, host_theta, x)), target, tol
        )
    except BudgetError as e:
        raise LearnError(
            f"--target-fraction: {e} by scaling the thresholds of {', '.join(log_base)}"
        ) from None


# ------------------------------------------------------------------ the whole job


def learn_kl(
    config,
    params,
    seqs_NxT: np.ndarray,
    init_states: list,
    settings: KLSettings,
    ckpt_dir: Path | None = None,
    save_every: int = 0,
    resume: bool = False,
    data_key: dict | None = None,
    provenance: dict | None = None,
    fraction_tol: float = DEFAULTS["fraction_tol"],
    measure_tokens: int = DEFAULTS["measure_tokens"],
    progress: bool = True,
    stop_at: int | None = None,
):
    """Learns thresholds end to end from the base `init_states` on the token rows
    `seqs_NxT`; returns `(SparsityState, info)`, or `(None, training state)` when stopped
    early at `stop_at` (tests of interruption)."""
    from jaxsparse.sparsity import make_state

    for st in init_states:
        st.check_model(config, "--init state")
    data_key = data_key or {}
    t0 = time.time()
    base = base_thresholds(config, init_states, settings.points)
    log_base0 = _log_base(base)
    rows = max(1, min(len(seqs_NxT), -(-measure_tokens // seqs_NxT.shape[1])))
    meter = FractionMeter(config, params, seqs_NxT[:rows])
    zero = {p: np.zeros((config.num_layers, 1), np.float32) for p in settings.points}
    # start on budget: one global scale on the base (deterministic, so a resumed run
    # recomputes the same base)
    s0, f0, trace0 = rescale_to_target(
        config, meter, log_base0, zero, settings.target_fraction, fraction_tol
    )
    log_base = {p: (v + np.float32(s0)).astype(np.float32) for p, v in log_base0.items()}
    trainer = KLTrainer(config, params, seqs_NxT, log_base, settings)
    start_step, ts, done = trainer.train(
        trainer.init(), config, ckpt_dir, resume, save_every, data_key, progress, stop_at
    )
    if not done:
        return None, ts
    s1, f1, trace1 = rescale_to_target(
        config, meter, log_base, ts["theta"], settings.target_fraction, fraction_tol
    )
    values = host_thresholds(
        config, log_base, {p: np.asarray(v) for p, v in ts["theta"].items()}, s1
    )
    alloc = {}
    for i in range(config.num_layers):
        alloc[f"layers_{i}"] = {
            p: float(np.mean(np.asarray(ts["theta"][p][i]))) + s1 for p in settings.points
        }
    details = {
        "objective": "kl",
        "settings": {**dataclasses.asdict(settings), "points": list(settings.points)},
        "init_methods": [st.method for st in init_states],
        "init_provenance": [st.meta.provenance for st in init_states],
        "start_step": start_step,
        "final_step": ts["step"],
        "train_tokens": int(seqs_NxT.size),
        "measure_tokens": int(rows * seqs_NxT.shape[1]),
        "initial_log_scale": s0,
        "initial_fraction": f0,
        "final_log_scale": s1,
        "final_fraction_on_training_text": f1,
        "log_scale_offsets": alloc,
        "trace": trainer.trace[-40:],
        "rescale_trace": {"initial": trace0, "final": trace1},
        "seconds": round(time.time() - t0, 1),
    }
    state = make_state(config, METHOD, 1.0 - settings.target_fraction, values, provenance, details)
    return state, {"training_state": ts, "trainer": trainer, "log_base": log_base, **details}


def describe(info: dict[str, Any]) -> str:
    tr = info["trace"]
    first, last = (tr[0], tr[-1]) if tr else ({}, {})
    return (
        f"{info['final_step']} steps, KL {first.get('kl', float('nan')):.4f} (step "
        f"{first.get('step')}) -> {last.get('kl', float('nan')):.4f}; fraction on the "
        f"training text {info['final_fraction_on_training_text']:.4f}"
    )
