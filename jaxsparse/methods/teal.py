"""TEAL fitting: magnitude thresholds on the inputs of every linear layer.

Four groups per layer, each with one threshold `quantile_{s_g}(abs(input))` over all
calibration tokens and channels of the layer (dense model):

  qkv      input of q_proj, k_proj, v_proj (`q_in` and `kv_in`: the same tensor, one threshold)
  o        input of o_proj (`o_in`)
  gate_up  input of gate_proj and up_proj (`ffn_in`; fc1 for OPT)
  down     input of down_proj (`down_in` = g * u; fc2's input for OPT)

Allocation of the per-group sparsities `s_g`:

- `uniform`: `s_g = S` for every group.
- `greedy` (TEAL's block-wise greedy optimization, per layer): with `f_g` the number of
  weights the group reads and `F = sum f_g`, start at `s_g = 0`; at each step try, for
  every group, raising `s_g` by `delta_g = step * F / f_g` (so that every candidate raises
  the layer's weight-read-weighted sparsity `S_B = sum s_g f_g / F` by the same `step`),
  run the block on the calibration inputs (the dense model's residual entering the block)
  with the candidate thresholds, and keep the candidate with the smallest
  `||block(x; s) - block(x; dense)||_2`. The last step is shortened so that `S_B = S`
  exactly; a group never exceeds `max_group_sparsity` (a capped group takes a shorter
  step, or none). So every layer reads a fraction `1 - S` of its linear weights while
  the greedy choice keeps its output close to the dense one.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from jaxsparse.config import FULL, ModelConfig
from jaxsparse.methods.statistics import CalibrationStats, Requirements

NAME = "teal"
GROUPS = ("qkv", "o", "gate_up", "down")
GROUP_POINTS = {
    "qkv": ("q_in", "kv_in"),
    "o": ("o_in",),
    "gate_up": ("ffn_in",),
    "down": ("down_in",),
}
GROUP_HIST = {"qkv": "q_in", "o": "o_in", "gate_up": "ffn_in", "down": "down_in"}
DEFAULT_OPTIONS = {"allocation": "uniform", "greedy_step": 0.05, "max_group_sparsity": 0.99}


def requirements(options: dict | None = None) -> Requirements:
    opts = {**DEFAULT_OPTIONS, **(options or {})}
    return Requirements(
        points=frozenset(GROUP_HIST.values()), block_inputs=opts["allocation"] == "greedy"
    )


def group_sizes(config: ModelConfig) -> dict[str, int]:
    """Weights read by each group's matrices (biases excluded), from
    `jaxsparse.sparsity.linear_sizes`."""
    from jaxsparse.sparsity import linear_sizes

    s = linear_sizes(config)
    ffn_in = ("fc1",) if config.family == "opt" else ("gate_proj", "up_proj")
    return {
        "qkv": s["q_proj"] + s["k_proj"] + s["v_proj"],
        "o": s["o_proj"],
        "gate_up": sum(s[n] for n in ffn_in),
        "down": s["fc2" if config.family == "opt" else "down_proj"],
    }


def group_thresholds(stats: CalibrationStats, layer: int, sparsities: dict[str, float]) -> dict:
    """Point thresholds of one layer for per-group sparsities."""
    out = {}
    for g, s in sparsities.items():
        t = stats.quantile(GROUP_HIST[g], layer, s)
        for p in GROUP_POINTS[g]:
            out[p] = t
    return out


def greedy_allocation(
    errors: Callable[[list[dict[str, float]]], np.ndarray],
    sizes: dict[str, int],
    target: float,
    step: float = 0.05,
    max_group_sparsity: float = 0.99,
) -> tuple[dict[str, float], list]:
    """TEAL's greedy allocation for one layer (see the module docstring).

    `errors(candidates)` returns the output error of each candidate allocation (a dict
    group -> sparsity). Returns the final allocation and the trace of (S_B, allocation).
    """
    total = float(sum(sizes.values()))
    s = {g: 0.0 for g in sizes}
    block = 0.0
    trace = [(0.0, dict(s))]
    while block < target - 1e-9:
        remaining = target - block
        cands, groups = [], []
        for g, size in sizes.items():
            room = max_group_sparsity - s[g]
            if room <= 1e-12:
                continue
            delta = min(step, remaining) * total / size
            cands.append({**s, g: s[g] + min(delta, room)})
            groups.append(g)
        if not cands:
            break  # every group capped: the target is out of reach
        err = np.asarray(errors(cands), np.float64)
        best = int(np.argmin(err))
        s = cands[best]
        block = sum(s[g] * sizes[g] for g in sizes) / total
        trace.append((block, dict(s)))
    return s, trace


def teal_uniform(stats: CalibrationStats, sparsity: float) -> dict:
    return {
        f"layers_{i}": group_thresholds(stats, i, {g: sparsity for g in GROUPS})
        for i in range(stats.num_layers)
    }


def make_block_error_fn(config: ModelConfig, layer_type: str = FULL):
    """A jit-compiled `f(block_params, x, valid, th_stack) -> [G]` output errors, for the
    blocks of `layer_type` (`ModelConfig.layer_type(i)`: Gemma 3's sliding and global layers
    differ).

    `th_stack` holds one thresholds dict per candidate, stacked on a leading axis.
    """
    import jax
    import jax.numpy as jnp

    from jaxsparse.models import positions_from_mask
    from jaxsparse.models.layers import rope_cos_sin
    from jaxsparse.models.llama import LlamaBlock
    from jaxsparse.models.opt import OPTBlock

    block = (
        OPTBlock(config) if config.family == "opt" else LlamaBlock(config, layer_type=layer_type)
    )

    def run(p, x, positions, rope, th):
        y, _ = block.apply({"params": p}, x, positions, positions, rope, None, 0, th)
        return y.astype(jnp.float32)

    @jax.jit
    def errors(p, x_BxTxD, valid_BxT, th_stack):
        positions = positions_from_mask(valid_BxT)
        rope = None if config.family == "opt" else rope_cos_sin(config, positions, layer_type)
        ref = run(p, x_BxTxD, positions, rope, None)
        w = valid_BxT.astype(jnp.float32)[..., None]

        def one(th):
            y = run(p, x_BxTxD, positions, rope, th)
            return jnp.sqrt(jnp.sum(jnp.square((y - ref) * w)))

        return jax.lax.map(one, th_stack)

    return errors


def teal_greedy(
    stats: CalibrationStats,
    sparsity: float,
    config: ModelConfig,
    params: dict,
    block_inputs: list[np.ndarray],
    valid: np.ndarray,
    step: float = 0.05,
    max_group_sparsity: float = 0.99,
    progress: bool = True,
    thresholds_fn: Callable = group_thresholds,
    desc: str = "teal",
):
    """Per-layer greedy allocation; returns (thresholds, per-layer group sparsities).

    `thresholds_fn(stats, layer, {group: sparsity})` gives a layer's point thresholds
    (scalars or per-channel arrays): TEAL's by default, WINA's in `methods.wina`."""
    import jax.numpy as jnp
    from tqdm import tqdm

    from jaxsparse.sparsity import model_widths

    sizes = group_sizes(config)
    errors_fns = {
        t: make_block_error_fn(config, t)
        for t in {config.layer_type(i) for i in range(config.num_layers)}
    }
    widths = model_widths(config)
    valid_dev = jnp.asarray(valid)
    values, alloc = {}, {}
    for i in tqdm(
        range(config.num_layers),
        desc=f"{desc} greedy allocation",
        unit="layer",
        disable=not progress,
    ):
        p = params[f"layers_{i}"]
        x = jnp.asarray(block_inputs[i])
        errors_fn = errors_fns[config.layer_type(i)]

        def errors(cands, i=i, p=p, x=x, errors_fn=errors_fn):
            ths = [thresholds_fn(stats, i, c) for c in cands]
            stack = {
                pt: jnp.stack(
                    [
                        jnp.broadcast_to(jnp.asarray(th.get(pt, 0.0), jnp.float32), (widths[pt],))
                        for th in ths
                    ]
                )
                for pt in widths
            }
            return np.asarray(errors_fn(p, x, valid_dev, stack))

        s, _ = greedy_allocation(errors, sizes, sparsity, step, max_group_sparsity)
        alloc[f"layers_{i}"] = {g: round(v, 6) for g, v in s.items()}
        values[f"layers_{i}"] = thresholds_fn(stats, i, s)
    return values, alloc


def fit_allocated(
    name: str,
    uniform_fn,
    thresholds_fn,
    stats: CalibrationStats,
    sparsity: float,
    options: dict | None = None,
    context=None,
):
    """TEAL's points at `sparsity`, with the uniform fit `uniform_fn(stats, sparsity)` or
    the greedy allocation over blocks, whose groups get their thresholds from
    `thresholds_fn(stats, layer, group_sparsities)`: the one allocation switch of teal and
    wina (`name` is the method, for messages and the progress bar). `context` (greedy
    only): dict with config, params, block_inputs, valid."""
    opts = {**DEFAULT_OPTIONS, **(options or {})}
    if opts["allocation"] == "uniform":
        return uniform_fn(stats, sparsity), {"allocation": "uniform"}
    if opts["allocation"] != "greedy":
        raise ValueError(f"{name} allocation {opts['allocation']!r}: expected uniform or greedy")
    if context is None:
        raise ValueError(f"{name} greedy allocation needs the model and the block inputs")
    values, alloc = teal_greedy(
        stats,
        sparsity,
        context["config"],
        context["params"],
        context["block_inputs"],
        context["valid"],
        opts["greedy_step"],
        opts["max_group_sparsity"],
        context.get("progress", True),
        thresholds_fn=thresholds_fn,
        desc=name,
    )
    return values, {
        "allocation": "greedy",
        "greedy_step": opts["greedy_step"],
        "group_sparsity": alloc,
    }


def fit(stats: CalibrationStats, sparsity: float, options: dict | None = None, context=None):
    """`context` (greedy only): dict with config, params, block_inputs, valid."""
    return fit_allocated("teal", teal_uniform, group_thresholds, stats, sparsity, options, context)
