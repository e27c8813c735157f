"""The optax training bookkeeping that `jaxsparse.learn` and `jaxsparse.learn_kl` share:
the annealed temperature, the training state, the stepping loop with its progress bar and
trace, and the checkpoints (orbax tree per step plus `meta.json`) that `--resume` continues
bitwise. What each trainer computes (its loss and its jitted step) stays in its own module.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

CKPT_META = "meta.json"


class LearnError(ValueError):
    """Bad learning input: a checkpoint of another run, a wrong init state."""


class TrainSettings:
    """Mixin of the frozen settings dataclasses of `learn` and `learn-kl` (fields `steps`,
    `tau_start`, `tau_end`)."""

    def tau(self, step):
        """tau_rel at step `step` (0-based), geometric from tau_start to tau_end."""
        frac = step / max(self.steps - 1, 1)
        return self.tau_start * (self.tau_end / self.tau_start) ** frac

    def resume_key(self) -> dict:
        """What must agree between a checkpoint and the run resuming it (JSON: tuples as
        lists)."""
        return {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(self).items()
            if k != "steps"
        }


def adam_step(loss_fn, opt, n: int, batch: int, pick, metrics):
    """The training step `learn` and `learn-kl` jit: `batch` of the `n` training rows drawn
    without replacement with the key the training state carries, the gradient of
    `loss_fn(theta, *pick(idx, *args), tau) -> (loss, aux)`, one `opt` (optax) update.
    Returns `step(theta, opt_state, key, tau, *args) -> (theta, opt_state, key,
    metrics(loss, aux))`."""
    import jax
    import optax

    def step(theta, opt_state, key, tau, *args):
        key, sub = jax.random.split(key)
        idx = jax.random.choice(sub, n, (batch,), replace=False)
        (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(theta, *pick(idx, *args), tau)
        upd, opt_state = opt.update(g, opt_state, theta)
        theta = optax.apply_updates(theta, upd)
        return theta, opt_state, key, metrics(loss, aux)

    return step


class TrainLoop:
    """The host side of a trainer. A subclass sets `self.settings`, `self.opt` (optax) and
    `self._step(theta, opt_state, key, tau, *self.step_args()) -> (theta, opt_state, key,
    metrics)`, and names the metrics shown on the progress bar in `postfix`."""

    desc = "learn"
    postfix: tuple[tuple[str, str], ...] = ()  # (metric, format spec)

    def step_args(self) -> tuple:
        raise NotImplementedError

    def init(self, theta) -> dict:
        """The training state at step 0 from the trained parameters `theta`."""
        import jax

        return {
            "theta": theta,
            "opt_state": self.opt.init(theta),
            "step": 0,
            "key": jax.random.key(self.settings.seed),
        }

    def train(
        self,
        ts: dict,
        config,
        ckpt_dir: Path | str | None,
        resume: bool,
        save_every: int,
        data_key: dict,
        progress: bool,
        stop_at: int | None = None,
    ) -> tuple[int, dict, bool]:
        """The whole training from `ts` (a fresh `init`): resumed from `ckpt_dir` with
        `resume` (`start_or_resume`), stepped to `settings.steps`, or only to `stop_at`
        (tests of interruption). Returns `(the step it started from, the training state,
        whether it reached settings.steps)`."""
        if ckpt_dir is not None:
            ckpt_dir = Path(ckpt_dir)
            ts = start_or_resume(ckpt_dir, resume, ts, config, self.settings, data_key, progress)
        start = int(ts["step"])
        steps = self.settings.steps
        until = steps if stop_at is None else min(stop_at, steps)
        ts = self.run(ts, until, save_every, ckpt_dir, progress)
        return start, ts, until >= steps

    def run(
        self,
        ts: dict,
        until: int,
        save_every: int = 0,
        ckpt_dir: Path | None = None,
        progress: bool = True,
    ) -> dict:
        """Steps `ts` (the training state) from its step up to `until`; saves every
        `save_every` steps; appends the metrics of every 10th step (and the last) to
        `self.trace`. Returns the new training state."""
        import jax.numpy as jnp
        from tqdm import tqdm

        theta, opt_state, key, step = ts["theta"], ts["opt_state"], ts["key"], ts["step"]
        bar = tqdm(total=until, initial=step, desc=self.desc, unit="step", disable=not progress)
        self.trace = getattr(self, "trace", [])
        args = self.step_args()
        while step < until:
            tau = jnp.float32(self.settings.tau(step))
            theta, opt_state, key, m = self._step(theta, opt_state, key, tau, *args)
            step += 1
            bar.update(1)
            if step % 10 == 0 or step == until:
                rec = {"step": step, **{k: float(v) for k, v in m.items()}, "tau": float(tau)}
                self.trace.append(rec)
                bar.set_postfix(**{k: format(rec[k], f) for k, f in self.postfix})
            ts = {"theta": theta, "opt_state": opt_state, "step": step, "key": key}
            if save_every and ckpt_dir is not None and step % save_every == 0:
                save_checkpoint(ckpt_dir, ts)
        bar.close()
        return {"theta": theta, "opt_state": opt_state, "step": step, "key": key}


# ------------------------------------------------------------------ checkpoints


def _fingerprint_dict(config) -> dict:
    from jaxsparse.sparsity import ModelFingerprint

    return dataclasses.asdict(ModelFingerprint.of(config))


def write_checkpoint_meta(ckpt_dir: Path, config, settings, data_key: dict) -> None:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "format": "jaxsparse.learn_checkpoint",
        "model": _fingerprint_dict(config),
        "settings": settings.resume_key(),
        "data": data_key,
    }
    (ckpt_dir / CKPT_META).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def check_checkpoint_meta(ckpt_dir: Path, config, settings, data_key: dict) -> None:
    """Raises LearnError unless the checkpoints in `ckpt_dir` belong to this run."""
    path = ckpt_dir / CKPT_META
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise LearnError(
            f"--resume: {ckpt_dir} holds no learn checkpoint ({CKPT_META} "
            f"missing); run without --resume"
        ) from None
    except json.JSONDecodeError as e:
        raise LearnError(f"{path}: not valid JSON ({e})") from None
    mine = settings.resume_key()
    theirs = doc.get("settings", {})
    if theirs.get("method") != mine["method"]:
        raise LearnError(
            f"--resume: {ckpt_dir} is a checkpoint of method "
            f"{theirs.get('method')!r}, not {mine['method']!r}; pass the same "
            f"--method or another --checkpoint-dir"
        )
    if doc.get("model") != _fingerprint_dict(config):
        from jaxsparse.sparsity import ModelFingerprint

        try:
            other = ModelFingerprint(**doc.get("model", {})).describe()
        except TypeError:
            other = str(doc.get("model"))
        raise LearnError(
            f"--resume: {ckpt_dir} is a checkpoint for another model.\n"
            f"  checkpoint: {other}\n  model: "
            f"{ModelFingerprint.of(config).describe()}"
        )
    diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if diff:
        raise LearnError(
            f"--resume: {ckpt_dir} was trained with other settings ("
            + ", ".join(f"{k}: {theirs.get(k)!r} there, {mine.get(k)!r} now" for k in diff)
            + ")"
        )
    if doc.get("data") != data_key:
        raise LearnError(
            f"--resume: {ckpt_dir} was trained on other data "
            f"({doc.get('data')} there, {data_key} now)"
        )


def save_checkpoint(ckpt_dir: Path, ts: dict) -> Path:
    """Writes `step_<N>/` (orbax: theta, optimizer state leaves, step, key) atomically."""
    import jax
    import orbax.checkpoint as ocp

    from jaxsparse.io import atomic_directory

    leaves = jax.tree.leaves(ts["opt_state"])
    tree = {
        "theta": {p: np.asarray(v) for p, v in ts["theta"].items()},
        "opt_state": {f"{i:04d}": np.asarray(v) for i, v in enumerate(leaves)},
        "step": np.asarray(ts["step"], np.int64),
        "key": np.asarray(jax.random.key_data(ts["key"])),
    }
    path = ckpt_dir / f"step_{ts['step']:08d}"
    with atomic_directory(path, overwrite=True) as tmp:
        ocp.PyTreeCheckpointer().save(tmp / "state", tree)
    return path


def start_or_resume(
    ckpt_dir: Path, resume: bool, ts: dict, config, settings, data_key: dict, progress: bool
) -> dict:
    """With `resume`: the training state of the latest complete checkpoint in `ckpt_dir`
    (its settings checked against this run's); else `ts`, after refusing a `ckpt_dir` that
    already holds checkpoints and writing this run's settings there."""
    if resume:
        check_checkpoint_meta(ckpt_dir, config, settings, data_key)
        last = latest_checkpoint(ckpt_dir)
        if last is None:
            raise LearnError(f"--resume: no complete checkpoint in {ckpt_dir}")
        ts = load_checkpoint(last, ts)
        if progress:
            print(f"resuming from {last} (step {ts['step']})", file=sys.stderr)
        return ts
    if ckpt_dir.exists() and any(ckpt_dir.iterdir()):
        raise LearnError(
            f"{ckpt_dir} already holds checkpoints; pass --resume to continue them or remove it"
        )
    write_checkpoint_meta(ckpt_dir, config, settings, data_key)
    return ts


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    from jaxsparse.io import is_complete

    steps = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir() and is_complete(p))
    return steps[-1] if steps else None


def load_checkpoint(path: Path, template: dict) -> dict:
    """The training state saved at `path`; `template` (a fresh `TrainLoop.init`) gives the
    optimizer state's structure and dtypes."""
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    raw = ocp.PyTreeCheckpointer().restore(path.absolute() / "state")
    leaves, treedef = jax.tree.flatten(template["opt_state"])
    saved = [raw["opt_state"][f"{i:04d}"] for i in range(len(leaves))]
    if len(raw["opt_state"]) != len(leaves):
        raise LearnError(
            f"{path}: optimizer state with {len(raw['opt_state'])} arrays, expected {len(leaves)}"
        )
    for a, b in zip(saved, leaves):
        if np.shape(a) != np.shape(b):
            raise LearnError(f"{path}: optimizer state shapes differ from this run's")
    opt_state = jax.tree.unflatten(
        treedef, [jnp.asarray(a, b.dtype) for a, b in zip(saved, leaves)]
    )
    theta = {p: jnp.asarray(v, jnp.float32) for p, v in raw["theta"].items()}
    if set(theta) != set(template["theta"]) or any(
        theta[p].shape != template["theta"][p].shape for p in theta
    ):
        raise LearnError(f"{path}: thresholds of other points or shapes than this run's")
    key = jax.random.wrap_key_data(jnp.asarray(raw["key"], jnp.uint32))
    return {"theta": theta, "opt_state": opt_state, "step": int(raw["step"]), "key": key}
