"""The scored forward pass that `jaxsparse eval` (`jaxsparse.evaluate`) and the
activated-params budget (`jaxsparse.budget`) share: one jit-compiled model call returning
per-token log-likelihoods, per-layer zero fractions of every sparsification point, and the
fraction of linear weights read (`jaxsparse.sparsity.activated_params_fraction`).

One function for both, so that a knob the budget solves hits the fraction `eval` reports
on the same text. Also where the model sows each activation (`TAP_PATHS`, `TAPS`) and how
fitting reads them: `dense_taps` runs a dense forward with its taps, `tap` picks one
layer's activation by name. It runs the model and sits with it (docs/design.md,
"Layers"): below fitting and inference, which both import it.
"""

from __future__ import annotations

import functools

# The sparsification points, in the order of `jaxsparse.rules.TENSORS` (kept literal here so
# that `jaxsparse --help` does not import jax; tests check they agree).
POINTS = ("q_in", "kv_in", "o_in", "ffn_in", "gate", "down_in")

# Where the model sows each point (and the raw up projection) in its "taps", "stats" and
# "zeros" collections: under `layers_i/<module>/<name>`.
TAP_PATHS = {
    "q_in": ("self_attn", "q_in"),
    "kv_in": ("self_attn", "kv_in"),
    "o_in": ("self_attn", "o_in"),
    "ffn_in": ("mlp", "ffn_in"),
    "gate": ("mlp", "gate"),
    "down_in": ("mlp", "down_in"),
    "up": ("mlp", "up"),
}


# Every activation a fitting pass reads from the "taps" collection: the points and the up
# projection (`TAP_PATHS`), the residual entering each block, each head's attention output.
TAPS = {**TAP_PATHS, "block_in": ("block_in",), "head_out": ("self_attn", "head_out")}


def point_value(layer_tree: dict, point: str):
    """The value sown for `point` in one layer's subtree of a collection (its first sow)."""
    module, name = TAP_PATHS[point]
    return layer_tree[module][name][0]


def dense_taps(model, params, tokens_BxT, valid_BxT) -> dict:
    """The "taps" collection of one dense forward of `model` over token rows (`valid_BxT`
    False on padding); read it with `tap`. Call it under jit."""
    from jaxsparse.models import positions_from_mask

    _, variables = model.apply(
        {"params": params}, tokens_BxT, positions_from_mask(valid_BxT), mutable=["taps"]
    )
    return variables["taps"]


def tap(taps: dict, layer: int, name: str):
    """The activation sown under `name` (a key of `TAPS`) in layer `layer` of `taps`."""
    tree = taps[f"layers_{layer}"]
    for key in TAPS[name]:
        tree = tree[key]
    return tree[0]


@functools.cache
def make_forward(config):
    """jit `f(params, tokens, valid, thresholds) -> dict` of per-token log-likelihoods and
    per-batch sparsity sums (see the module docstring). Cached per config, so evaluators of
    one model share their compilations."""
    import jax
    import jax.numpy as jnp

    from jaxsparse.models import build_model, positions_from_mask
    from jaxsparse.sparsity import activated_params_fraction, predictor_weights

    model = build_model(config)

    def forward(params, tokens_BxT, valid_BxT, thresholds):
        positions = positions_from_mask(valid_BxT)
        (logits, _), variables = model.apply(
            {"params": params}, tokens_BxT, positions, thresholds=thresholds, mutable=["stats"]
        )
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        next_ll = jnp.take_along_axis(logp, tokens_BxT[:, 1:, None], axis=-1)[..., 0]
        w = valid_BxT.astype(jnp.float32)
        zero_sums, read_layers = [], []
        for i in range(config.num_layers):
            s = variables["stats"][f"layers_{i}"]
            z = {p: point_value(s, p) for p in POINTS}
            zero_sums.append(jnp.stack([jnp.sum(z[p] * w) for p in POINTS]))
            dens = {p: 1.0 - z[p] for p in POINTS}
            if "gate_rows" in s.get("mlp", {}):  # Deja Vu: gate_proj rows skipped
                dens["gate_rows"] = 1.0 - s["mlp"]["gate_rows"][0]
            if "q_rows" in s.get("self_attn", {}):  # Deja Vu: unselected heads' q rows
                dens["q_rows"] = 1.0 - s["self_attn"]["q_rows"][0]
            th = {} if thresholds is None else thresholds[f"layers_{i}"]
            read_layers.append(
                activated_params_fraction(config, dens, predictor_weights(th.get("predictor")))
            )
        read_LxBxT = jnp.stack(read_layers)
        return {
            "next_ll": next_ll,  # [B, T-1]: log p(token t+1 | tokens <= t)
            "zero_sums": jnp.stack(zero_sums),  # [L, P]
            "read_sum": jnp.sum(jnp.sum(read_LxBxT, axis=0) / config.num_layers * w),
            "layer_read_sums": jnp.sum(read_LxBxT * w, axis=(1, 2)),  # [L]
            "count": jnp.sum(w),
        }

    return jax.jit(forward)
