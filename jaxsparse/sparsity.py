"""The sparsity state: what a fitted method hands to inference, and how it is stored.

`SparsityState` is a pytree holding one threshold vector per block and per sparsification
point (`jaxsparse.rules.TENSORS`), shape `[width]` for every point of every method: a
per-layer threshold (cats, teal) is broadcast to a per-channel vector and a point a method
does not use holds zeros (`abs(x) < 0` zeroes nothing). Every threshold method at every
sparsity therefore has the same tree structure and the same shapes, and one compiled
forward (which takes `state.thresholds_for_model()`) serves them all. `predictors` holds
the Deja Vu low-rank predictors (`{"layers_i": {"ffn_w1", "ffn_b1", "ffn_w2", "ffn_b2",
"head_w1", ..., "ffn_k", "head_k"}}`, see `jaxsparse.models.predictor.predicted_masks`); threshold
methods (learned ones included) leave it None. A dejavu state's `thresholds_for_model()`
adds each layer's predictor under the key "predictor" (a different tree, so one more
compile, shared by every dejavu state of the same ranks).

The static metadata (`StateMeta`) names the method, the target sparsity, the model the
state was fitted for (`ModelFingerprint`: model type, shapes and a hash of the config) and
the calibration provenance. `save_state` / `load_state` store a state as an orbax
checkpoint plus `state.json`, atomically; loading checks the model, the shapes and that
every threshold is finite. This module holds no fitting code (see `jaxsparse.methods`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import flax.struct
import numpy as np

from jaxsparse import rules
from jaxsparse.config import ModelConfig

FORMAT = "jaxsparse.sparsity_state"
FORMAT_VERSION = 1
STATE_JSON = "state.json"
THRESHOLDS_DIR = "thresholds"
PREDICTORS_DIR = "predictors"
PREDICTOR_KEYS = (
    "ffn_w1",
    "ffn_b1",
    "ffn_w2",
    "ffn_b2",
    "head_w1",
    "head_b1",
    "head_w2",
    "head_b2",
    "ffn_k",
    "head_k",
)


class StateError(ValueError):
    """A sparsity state that cannot be used: another model, bad shapes, non-finite values."""


# ------------------------------------------------------------------ model fingerprint

# Config fields that do not change which activations a model computes: the params dtype
# (a state fitted in float32 serves the bfloat16 model) and the token ids.
_FINGERPRINT_IGNORES = ("dtype", "bos_token_id", "eos_token_ids", "pad_token_id")


@dataclasses.dataclass(frozen=True)
class ModelFingerprint:
    """Identifies the model a state was fitted for: its type, its shapes and a config hash.

    The hash covers every `ModelConfig` field except the dtype and the token ids, so two
    checkpoints with the same architecture (a base model and its instruct tuning) share a
    fingerprint; the checkpoint itself is recorded in the provenance, not checked.
    """

    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    config_hash: str

    @classmethod
    def of(cls, config: ModelConfig) -> ModelFingerprint:
        d = {k: v for k, v in config.to_dict().items() if k not in _FINGERPRINT_IGNORES}
        digest = hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
        return cls(
            model_type=config.model_type,
            num_layers=config.num_layers,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_heads=config.num_heads,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            vocab_size=config.vocab_size,
            config_hash=digest,
        )

    def describe(self) -> str:
        return (
            f"{self.model_type} (layers={self.num_layers}, hidden={self.hidden_size}, "
            f"intermediate={self.intermediate_size}, heads={self.num_heads}/"
            f"{self.num_kv_heads}x{self.head_dim}, vocab={self.vocab_size}, "
            f"config hash {self.config_hash})"
        )

    def widths(self) -> dict[str, int]:
        q_dim = self.num_heads * self.head_dim
        return {
            name: rules.tensor_width(name, self.hidden_size, q_dim, self.intermediate_size)
            for name in rules.TENSORS
        }


# ------------------------------------------------------------------ metadata


@dataclasses.dataclass(frozen=True)
class StateMeta:
    """Static (non-array) part of a state. Hashable: JSON-valued fields are kept as text."""

    method: str
    target_sparsity: float
    model: ModelFingerprint
    provenance_json: str = "{}"  # data sources, token count, seq len, date, jax version
    details_json: str = "{}"  # method options and per-point target sparsities

    @property
    def provenance(self) -> dict[str, Any]:
        return json.loads(self.provenance_json)

    @property
    def details(self) -> dict[str, Any]:
        return json.loads(self.details_json)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "target_sparsity": self.target_sparsity,
            "model": dataclasses.asdict(self.model),
            "provenance": self.provenance,
            "details": self.details,
        }


def make_meta(
    method: str,
    target_sparsity: float,
    config: ModelConfig,
    provenance: dict | None = None,
    details: dict | None = None,
) -> StateMeta:
    return StateMeta(
        method=method,
        target_sparsity=float(target_sparsity),
        model=ModelFingerprint.of(config),
        provenance_json=json.dumps(provenance or {}, sort_keys=True),
        details_json=json.dumps(details or {}, sort_keys=True),
    )


# ------------------------------------------------------------------ the state


@flax.struct.dataclass
class SparsityState:
    """Thresholds `{"layers_i": {point: float32[width]}}` for every block and every point.

    `meta` is static: pass `state.thresholds_for_model()` (not the state) into a jitted
    function, so that changing the method or the sparsity does not recompile.
    """

    thresholds: dict[str, dict[str, Any]]
    meta: StateMeta = flax.struct.field(pytree_node=False)
    predictors: Any = None  # Deja Vu low-rank predictors; None for threshold methods

    @property
    def method(self) -> str:
        return self.meta.method

    @property
    def target_sparsity(self) -> float:
        return self.meta.target_sparsity

    @property
    def num_layers(self) -> int:
        return len(self.thresholds)

    def thresholds_for_model(self) -> dict[str, dict[str, Any]]:
        """The `thresholds=` argument of the models: the full tree, zeros where unused
        (with a Deja Vu state, each layer's predictor under "predictor")."""
        if self.predictors is None:
            return self.thresholds
        return {
            layer: {**points, "predictor": self.predictors[layer]}
            for layer, points in self.thresholds.items()
        }

    def check_model(self, config: ModelConfig, where: str = "sparsity state") -> None:
        """Raises StateError unless the state was fitted for a model with `config`."""
        mine, theirs = self.meta.model, ModelFingerprint.of(config)
        if mine != theirs:
            raise StateError(
                f"{where}: calibrated for another model.\n  state: {mine.describe()}\n"
                f"  model: {theirs.describe()}\nre-run `jaxsparse calibrate` for this model"
            )
        _check_tree(self.thresholds, mine, where)
        if self.predictors is not None:
            check_predictors(self.predictors, mine, where)


def model_widths(config: ModelConfig) -> dict[str, int]:
    return {
        name: rules.tensor_width(name, config.hidden_size, config.q_dim, config.intermediate_size)
        for name in rules.TENSORS
    }


# ------------------------------------------------------------------ weights read per token


def linear_sizes(config: ModelConfig) -> dict[str, int]:
    """Weights of each linear layer of one block (kernels only)."""
    d, m = config.hidden_size, config.intermediate_size
    sizes = {
        "q_proj": d * config.q_dim,
        "k_proj": d * config.kv_dim,
        "v_proj": d * config.kv_dim,
        "o_proj": config.q_dim * d,
    }
    if config.family == "opt":
        sizes.update(fc1=d * m, fc2=m * d)
    else:
        sizes.update(gate_proj=d * m, up_proj=d * m, down_proj=m * d)
    return sizes


def predictor_weights(predictor: dict | None) -> int:
    """Weights one layer's Deja Vu predictors read per token: `W1` and `W2` of the FFN and
    the head predictor (biases excluded, as for the blocks); 0 without a predictor."""
    if not predictor:
        return 0
    return int(
        sum(
            np.prod(np.shape(v))
            for k, v in predictor.items()
            if k.endswith(("_w1", "_w1t", "_w2"))  # _w1t: W1 transposed (decode_layout)
        )
    )


def activated_params_fraction(config: ModelConfig, density: dict[str, Any], predictor: float = 0.0):
    """The fraction of one block's linear weights read for a token, from the density
    (1 - zero fraction) of each point after masking: the one budget every method is
    compared at (docs/methods.md).

    q_proj reads `density["q_in"]` of its rows times `q_rows` (the share of its output
    columns computed: Deja Vu skips unselected heads'; default 1), k/v_proj `kv_in`,
    o_proj `o_in`, gate_proj `ffn_in * gate_rows` (`gate_rows`: the share of gate_proj's
    output rows computed; Deja Vu skips the predicted-inactive ones, default 1), up_proj
    `ffn_in * gate` (zero inputs skip rows, zero gate channels skip columns), down_proj
    `down_in`; OPT: fc1 `ffn_in`, fc2 `down_in`. `predictor` weights read per token on
    top (Deja Vu's predictors, `predictor_weights`) are added to the numerator, so such a
    fraction can exceed the blocks' own share. Densities may be numbers or (jax or numpy)
    arrays of any one shape, e.g. per token; a differentiable density (a straight-through
    mask's mean) gives a differentiable fraction.
    """
    sizes = linear_sizes(config)
    total = float(sum(sizes.values()))
    d = density
    read = (
        sizes["q_proj"] * d["q_in"] * d.get("q_rows", 1.0)
        + (sizes["k_proj"] + sizes["v_proj"]) * d["kv_in"]
        + sizes["o_proj"] * d["o_in"]
    )
    if config.family == "opt":
        read = read + sizes["fc1"] * d["ffn_in"] + sizes["fc2"] * d["down_in"]
    else:
        read = read + (
            sizes["gate_proj"] * d["ffn_in"] * d.get("gate_rows", 1.0)
            + sizes["up_proj"] * d["ffn_in"] * d["gate"]
            + sizes["down_proj"] * d["down_in"]
        )
    return (read + predictor) / total


def shares_qkv_input(thresholds: dict | None) -> bool:
    """Whether q and k/v read the same input under `thresholds` (a model's `thresholds=`
    tree): in every layer the `q_in` and `kv_in` thresholds (a missing one: zeros) and
    keep-masks are equal, and no relaxed (learning) mask is used. Only then may q/k/v run as
    one fused matmul on the q input (`jaxsparse.registry.kernels_for_method`); otherwise k/v
    must read their own, differently thresholded input. None (dense) shares it."""
    if thresholds is None:
        return True
    for layer in thresholds.values():
        if "relax_tau" in layer:
            return False
        q, kv = layer.get("q_in"), layer.get("kv_in")
        if (q is None) != (kv is None) and not np.all(np.asarray(q if kv is None else kv) == 0):
            return False
        if q is not None and kv is not None and not np.array_equal(np.asarray(q), np.asarray(kv)):
            return False
        masks = layer.get("masks", {})
        mq, mkv = masks.get("q_in"), masks.get("kv_in")
        if (mq is None) != (mkv is None) or (
            mq is not None and not np.array_equal(np.asarray(mq), np.asarray(mkv))
        ):
            return False
    return True


def drop_zero_points(thresholds: dict | None) -> dict | None:
    """`thresholds` (a model's `thresholds=` tree) without the sparsification points whose
    threshold is zero in every layer (a state holds zeros where its method thresholds
    nothing: CHESS's q/k/v, o and FFN inputs). `abs(x) >= 0` keeps every entry, so the
    model computes the same values with the point absent (its zero fraction is still
    recorded as "stats"; the decode loop no longer counts its zeros, as for any point left
    dense); what goes is the select itself, which XLA does not always fuse: before an
    XLA o_proj it is a kernel of its own per layer (benchmarks/NOTES_kernels.md). Keys that
    are not points (masks, learning's temperature) stay; a Deja Vu tree (with predictors,
    whose masks are shaped from its `o_in` entry) is returned as it is."""
    if thresholds is None or any("predictor" in layer for layer in thresholds.values()):
        return thresholds
    zero = {
        p
        for p in rules.TENSORS
        if all(p in layer for layer in thresholds.values())
        and all(np.all(np.asarray(layer[p]) == 0) for layer in thresholds.values())
    }
    if not zero:
        return thresholds
    return {
        name: {k: v for k, v in layer.items() if k not in zero}
        for name, layer in thresholds.items()
    }


def layer_names(num_layers: int) -> list[str]:
    return [f"layers_{i}" for i in range(num_layers)]


def thresholds_from_values(
    config: ModelConfig, values: dict[str, dict[str, float | np.ndarray]]
) -> dict:
    """The full threshold tree from `{layer: {point: scalar or [width]}}`; the rest is 0.

    A scalar (a per-layer threshold) is broadcast to the point's width.
    """
    widths = model_widths(config)
    tree = {}
    for layer in layer_names(config.num_layers):
        given = values.get(layer, {})
        unknown = set(given) - set(rules.TENSORS)
        if unknown:
            raise ValueError(f"{layer}: unknown sparsification points {sorted(unknown)}")
        tree[layer] = {}
        for name in rules.TENSORS:
            v = np.asarray(given.get(name, 0.0), np.float32)
            if v.ndim == 0:
                v = np.full((widths[name],), v, np.float32)
            if v.shape != (widths[name],):
                raise ValueError(
                    f"{layer}/{name}: threshold shape {v.shape}, expected ({widths[name]},)"
                )
            tree[layer][name] = v
    return tree


def dense_state(config: ModelConfig) -> SparsityState:
    """The empty state: every threshold 0, so nothing is zeroed."""
    return SparsityState(
        thresholds=thresholds_from_values(config, {}), meta=make_meta("dense", 0.0, config)
    )


def make_state(
    config: ModelConfig,
    method: str,
    target_sparsity: float,
    values: dict[str, dict[str, float | np.ndarray]],
    provenance: dict | None = None,
    details: dict | None = None,
) -> SparsityState:
    """A threshold state for `config`; `values` as in `thresholds_from_values`."""
    state = SparsityState(
        thresholds=thresholds_from_values(config, values),
        meta=make_meta(method, target_sparsity, config, provenance, details),
    )
    _check_tree(state.thresholds, state.meta.model, f"{method} state")
    return state


def _check_tree(tree: dict, fp: ModelFingerprint, where: str) -> None:
    """Shapes against the fingerprint, and finiteness, with the layer and point named."""
    expected = layer_names(fp.num_layers)
    if sorted(tree) != sorted(expected):
        raise StateError(
            f"{where}: holds layers {sorted(tree)[:3]}... ({len(tree)} layers), "
            f"expected {fp.num_layers} layers for {fp.describe()}"
        )
    widths = fp.widths()
    for layer in expected:
        points = tree[layer]
        if sorted(points) != sorted(rules.TENSORS):
            raise StateError(
                f"{where}: {layer} holds points {sorted(points)}, expected {sorted(rules.TENSORS)}"
            )
        for name in rules.TENSORS:
            v = np.asarray(points[name])
            if v.shape != (widths[name],):
                raise StateError(
                    f"{where}: {layer}/{name} has shape {v.shape}, expected ({widths[name]},) "
                    f"for {fp.describe()}"
                )
            bad = ~np.isfinite(v)
            if bad.any():
                kinds = sorted({"NaN" if np.isnan(x) else "inf" for x in v[bad]})
                raise StateError(
                    f"{where}: {layer}/{name} holds {int(bad.sum())} non-finite threshold(s) "
                    f"({', '.join(kinds)}, first at channel {int(np.flatnonzero(bad)[0])}); "
                    f"re-run `jaxsparse calibrate`"
                )


# ------------------------------------------------------------------ storage


def save_state(state: SparsityState, directory: str | Path, overwrite: bool = False) -> Path:
    """Writes `state` to `directory` (orbax thresholds + state.json), atomically."""
    import orbax.checkpoint as ocp

    from jaxsparse.io import atomic_directory, natural_order

    _check_tree(state.thresholds, state.meta.model, f"{directory}")
    if state.predictors is not None:
        check_predictors(state.predictors, state.meta.model, f"{directory}")
    tree = {
        layer: {k: np.asarray(v, np.float32) for k, v in points.items()}
        for layer, points in state.thresholds.items()
    }
    with atomic_directory(directory, overwrite) as tmp:
        ocp.PyTreeCheckpointer().save(tmp / THRESHOLDS_DIR, tree)
        if state.predictors is not None:
            ocp.PyTreeCheckpointer().save(tmp / PREDICTORS_DIR, _predictor_arrays(state.predictors))
        doc = {"format": FORMAT, "version": FORMAT_VERSION, **state.meta.to_dict()}
        (tmp / STATE_JSON).write_text(json.dumps(natural_order(doc), indent=2) + "\n")
    return Path(directory)


def read_state_meta(directory: str | Path) -> StateMeta:
    """The metadata of a stored state, without reading the thresholds."""
    from jaxsparse.io import require_complete

    directory = require_complete(
        directory, "sparsity state directory", "re-run `jaxsparse calibrate`"
    )
    path = directory / STATE_JSON
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise StateError(f"{directory}: no {STATE_JSON}; not a sparsity state directory") from None
    except json.JSONDecodeError as e:
        raise StateError(f"{path}: not valid JSON ({e})") from None
    if doc.get("format") != FORMAT:
        raise StateError(f"{path}: format {doc.get('format')!r}, expected {FORMAT!r}")
    if doc.get("version") != FORMAT_VERSION:
        raise StateError(
            f"{path}: format version {doc.get('version')}, this jaxsparse reads "
            f"version {FORMAT_VERSION}"
        )
    try:
        return StateMeta(
            method=doc["method"],
            target_sparsity=float(doc["target_sparsity"]),
            model=ModelFingerprint(**doc["model"]),
            provenance_json=json.dumps(doc.get("provenance", {}), sort_keys=True),
            details_json=json.dumps(doc.get("details", {}), sort_keys=True),
        )
    except (KeyError, TypeError) as e:
        raise StateError(f"{path}: malformed state metadata ({e})") from None


def load_state(directory: str | Path, config: ModelConfig | None = None) -> SparsityState:
    """Reads a state written by `save_state`; with `config`, checks it fits that model.

    Raises StateError naming the directory and both models when the state was fitted for
    another model, and naming the layer and point for a wrong shape or a NaN/inf threshold.
    """
    import orbax.checkpoint as ocp

    meta = read_state_meta(directory)
    directory = Path(directory)
    if config is not None and meta.model != ModelFingerprint.of(config):
        raise StateError(
            f"{directory}: sparsity state calibrated for another model.\n"
            f"  state: {meta.model.describe()}\n  model: "
            f"{ModelFingerprint.of(config).describe()}\n"
            f"re-run `jaxsparse calibrate` with this model"
        )
    try:
        tree = ocp.PyTreeCheckpointer().restore(directory.absolute() / THRESHOLDS_DIR)
    except Exception as e:  # noqa: BLE001 (orbax raises many types for a damaged tree)
        raise StateError(
            f"{directory}: cannot read the thresholds ({type(e).__name__}: {e})"
        ) from None
    tree = {
        layer: {k: np.asarray(v, np.float32) for k, v in points.items()}
        for layer, points in tree.items()
    }
    _check_tree(tree, meta.model, str(directory))
    predictors = None
    if (directory / PREDICTORS_DIR).exists():
        try:
            raw = ocp.PyTreeCheckpointer().restore(directory.absolute() / PREDICTORS_DIR)
        except Exception as e:  # noqa: BLE001
            raise StateError(
                f"{directory}: cannot read the Deja Vu predictors ({type(e).__name__}: {e})"
            ) from None
        predictors = _predictor_arrays(raw)
        check_predictors(predictors, meta.model, str(directory))
    elif meta.method == "dejavu":
        raise StateError(
            f"{directory}: a dejavu state without {PREDICTORS_DIR}/; re-run "
            f"`jaxsparse train-predictors`"
        )
    return SparsityState(thresholds=tree, meta=meta, predictors=predictors)


def _predictor_arrays(tree: dict) -> dict:
    """Host arrays: float32 weights, int32 scalar k's."""
    return {
        layer: {
            k: (
                np.asarray(v, np.int32).reshape(())
                if k.endswith("_k")
                else np.asarray(v, np.float32)
            )
            for k, v in w.items()
        }
        for layer, w in tree.items()
    }


def check_predictors(tree: dict, fp: ModelFingerprint, where: str) -> None:
    """Deja Vu predictor shapes against the model, finiteness, and k in [1, width]."""
    expected = layer_names(fp.num_layers)
    if sorted(tree) != sorted(expected):
        raise StateError(
            f"{where}: predictors for {len(tree)} layers, expected "
            f"{fp.num_layers} for {fp.describe()}"
        )
    d, m, heads = fp.hidden_size, fp.intermediate_size, fp.num_heads
    for layer in expected:
        w = tree[layer]
        if sorted(w) != sorted(PREDICTOR_KEYS):
            raise StateError(
                f"{where}: {layer} predictor holds {sorted(w)}, expected {sorted(PREDICTOR_KEYS)}"
            )
        for which, out in (("ffn", m), ("head", heads)):
            r = np.shape(w[f"{which}_w1"])[-1]
            want = {
                f"{which}_w1": (d, r),
                f"{which}_b1": (r,),
                f"{which}_w2": (r, out),
                f"{which}_b2": (out,),
            }
            for k, shape in want.items():
                if np.shape(w[k]) != shape:
                    raise StateError(
                        f"{where}: {layer}/{k} has shape {np.shape(w[k])}, "
                        f"expected {shape} for {fp.describe()}"
                    )
                if not np.all(np.isfinite(np.asarray(w[k]))):
                    raise StateError(f"{where}: {layer}/{k} holds non-finite values")
            k = int(np.asarray(w[f"{which}_k"]))
            if not 1 <= k <= out:
                raise StateError(f"{where}: {layer}/{which}_k = {k} is outside [1, {out}]")
