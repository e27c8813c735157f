"""Generation: the cached, batched, compiled decode against a plain full-forward greedy loop."""

import dataclasses

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import (
    GPU_IMPL,
    block_jaxprs,
    decode_logits,
    ops_outside_kernels,
    pallas_calls,
    pallas_calls_of,
    random_thresholds,
    sub_jaxprs,
)

from jaxsparse.config import ModelConfig
from jaxsparse.generate import Generator, SamplingParams, bucket_length, sample_logits
from jaxsparse.models import Kernels, build_model, init_params

# The decode-parity tests below run `GPU_IMPL` (tests/tiny.py): compiled on a CUDA machine,
# in models whose heads are at least 32 wide (the attention kernel's tensor-core dots need
# 16 per RoPE half) and with float32 matmuls at full precision (`full_precision`: XLA's
# default on a GPU is TF32, the kernels' float32 dots are exact).
pytestmark = pytest.mark.usefixtures("full_precision")


def _head_dim(d: int) -> int:
    """A test model's head width: `d`, or at least 32 for the compiled GPU kernels."""
    return max(d, 32) if GPU_IMPL == "gpu" else d


TINY = {
    "vocab_size": 97,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_layers": 2,
    "num_heads": 4,
    "head_dim": 8,
}


def tiny(model_type="llama", **kw):
    kw = {**TINY, **kw}
    if model_type == "opt":
        base = {
            "num_kv_heads": 4,
            "position_offset": 2,
            "qkv_bias": True,
            "o_bias": True,
            "mlp_bias": True,
            "tie_word_embeddings": True,
            "max_position_embeddings": 128,
        }
    else:
        base = {"num_kv_heads": 2, "tie_word_embeddings": True}
    return ModelConfig(model_type=model_type, **{**base, **kw})


def greedy_reference(config, params, prompt, n):
    """Greedy decoding by recomputing the full forward pass for every token, no cache."""
    model = build_model(config)
    ids = list(prompt)
    width = len(prompt) + n  # one shape for every step: right-padded, read at the last real token
    fwd = jax.jit(lambda p, t: model.apply({"params": p}, t, jnp.arange(width)[None])[0])
    for _ in range(n):
        logits = fwd(params, jnp.asarray([ids + [0] * (width - len(ids))]))
        ids.append(int(jnp.argmax(logits[0, len(ids) - 1])))
    return ids[len(prompt) :]


@pytest.mark.parametrize("model_type", ["llama", "opt"])
def test_batched_cached_greedy_matches_full_forward(model_type):
    config = tiny(model_type)
    params = init_params(config, seed=1)
    params = jax.tree.map(lambda x: x * 10, params)  # sharper logits: fewer near-ties
    gen = Generator(config, params)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 97, size=n).tolist() for n in (5, 17, 1)]
    result = gen.generate_ids(prompts, max_new_tokens=8, stop_at_eos=False)
    for prompt, got in zip(prompts, result.tokens):
        assert got == greedy_reference(config, params, prompt, 8)
    assert result.decode_steps == 7
    assert result.prefill_tokens_per_s > 0 and result.decode_tokens_per_s > 0


def test_decode_loop_compiled_with_command_buffers_when_asked(monkeypatch):
    """`Generator(command_buffers=True)` compiles the decode loop (not the prefill) with
    `COMMAND_BUFFERS`; by default neither gets them. The tokens do not change."""
    from jaxsparse import generate

    seen = []
    compile_ = jax.stages.Lowered.compile

    def spy(self, compiler_options=None, **kw):
        seen.append(compiler_options)
        return compile_(self, compiler_options=compiler_options, **kw)

    monkeypatch.setattr(jax.stages.Lowered, "compile", spy)
    config = tiny()
    params = init_params(config, seed=1)
    ids = {}
    for flag in (False, True):
        seen.clear()
        gen = Generator(config, params, command_buffers=flag)
        ids[flag] = gen.generate_ids([[5, 6, 7]], max_new_tokens=6, stop_at_eos=False).tokens
        assert seen == [None, generate.COMMAND_BUFFERS if flag else None]  # prefill, loop
    assert ids[True] == ids[False]
    assert not Generator(config, params).command_buffers


def test_compiled_once_per_shape_and_reused():
    config = tiny()
    gen = Generator(config, init_params(config))
    gen.generate_ids([[5, 6, 7]], max_new_tokens=4, stop_at_eos=False)
    n = len(gen._compiled)
    r = gen.generate_ids(
        [[8, 9]],
        max_new_tokens=4,
        stop_at_eos=False,
        sampling=SamplingParams(temperature=0.7, top_k=5, top_p=0.9, seed=3),
    )
    assert len(gen._compiled) == n + 2  # sampling with filters: its own prefill and loop
    r = gen.generate_ids(
        [[8, 9]],
        max_new_tokens=4,
        stop_at_eos=False,
        sampling=SamplingParams(temperature=1.3, top_k=2, top_p=0.5, seed=4),
    )
    assert len(gen._compiled) == n + 2  # same bucket, batch, length: the values are data
    assert r.compile_s == 0.0
    gen.generate_ids([[8, 9], [1]], max_new_tokens=4, stop_at_eos=False)
    assert len(gen._compiled) == n + 4  # a new batch size compiles prefill and loop once


@pytest.mark.parametrize("model_type", ["llama", "opt"])
def test_blocks_traced_once_and_sown_values_kept(model_type, fresh_block_traces):
    """The decoder blocks run through one jitted `_apply_block` each: blocks of the same
    shapes share one trace (the model's jaxpr calls the same block jaxpr per layer), and
    what they sow (zero counts, statistics, taps) comes out per layer as before."""
    config = tiny(model_type, num_layers=3)
    model = build_model(config)
    params = init_params(config, seed=1)
    tokens = jnp.asarray([[5, 6, 7, 8]])
    pos = jnp.arange(4)[None]
    cut = (0.0, 1e9, 0.0)  # the middle layer zeroes its whole down input
    th = {f"layers_{i}": {"down_in": jnp.float32(t)} for i, t in enumerate(cut)}
    jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, tokens, pos, thresholds=th))(params)
    blocks = block_jaxprs(jaxpr.jaxpr)
    assert len(blocks) == config.num_layers and all(b is blocks[0] for b in blocks)
    (_, _), sown = model.apply(
        {"params": params}, tokens, pos, thresholds=th, mutable=["stats", "zeros", "taps"]
    )
    assert sorted(sown["stats"]) == [f"layers_{i}" for i in range(3)]
    zero = [float(np.mean(sown["stats"][f"layers_{i}"]["mlp"]["down_in"][0])) for i in range(3)]
    assert zero[1] == 1.0 and zero[0] < 1.0 and zero[2] < 1.0  # each layer's own threshold
    for i in range(3):
        (down_in,) = sown["taps"][f"layers_{i}"]["mlp"]["down_in"]
        (zeros,) = sown["zeros"][f"layers_{i}"]["mlp"]["down_in"]
        want = (np.asarray(down_in) == 0) | (np.abs(np.asarray(down_in)) < cut[i])
        np.testing.assert_array_equal(np.asarray(zeros), want)


def test_decode_logits_helper_applies_the_thresholds():
    """tests/tiny.py's `decode_logits`, which the decode-parity tests below run both paths
    through: its steps apply the thresholds given (the logits move, and the zero masks
    it returns are those of the thresholded points), and none without them."""
    config = tiny()
    params = jax.tree.map(lambda x: x * 10, init_params(config, seed=2))
    thresholds = random_thresholds(config, jax.random.key(4), scale=0.6)
    prompt = jnp.asarray([[5, 6, 7, 8], [9, 10, 11, 12]])
    dense = decode_logits(config, params, Kernels(), None, prompt, 2)
    masked, zeros = decode_logits(config, params, Kernels(), thresholds, prompt, 2, zeros=True)
    assert dense.shape == masked.shape == (2, 2, config.vocab_size)
    assert np.linalg.norm(masked - dense) > 0.05 * np.linalg.norm(dense)
    assert zeros.dtype == bool and 0.05 < zeros.mean() < 0.95
    _, none = decode_logits(config, params, Kernels(), None, prompt, 2, zeros=True)
    assert not none.any()


def test_points_with_zero_thresholds_are_dropped_before_the_loop():
    """A state holds zeros where its method thresholds nothing (CHESS: every point but the
    gate). The Generator drops those points before compiling (`drop_zero_points`): a
    threshold of 0 keeps every entry, but its select before o_proj is a kernel per layer
    on a GPU. Tokens and logits are those of the full tree, measured sparsity is
    reported for the points sparsified (not the dropped ones), and a point zero in some
    layers only is kept."""
    from jaxsparse.sparsity import drop_zero_points

    config = tiny(intermediate_size=96)
    params = jax.tree.map(lambda x: x * 10, init_params(config, seed=2))
    full = random_thresholds(config, jax.random.key(4), scale=0.3)
    chess = {
        layer: {p: (t if p == "gate" else jnp.zeros_like(t)) for p, t in points.items()}
        for layer, points in full.items()
    }
    chess["layers_0"]["masks"] = {}  # not a point: kept as it is
    dropped = drop_zero_points(chess)
    assert {k: sorted(v) for k, v in dropped.items()} == {
        "layers_0": ["gate", "masks"],
        "layers_1": ["gate"],
    }
    assert drop_zero_points(None) is None and drop_zero_points(full) is full
    some = {**chess, "layers_1": {**chess["layers_1"], "o_in": full["layers_1"]["o_in"]}}
    assert "o_in" in drop_zero_points(some)["layers_0"]  # not zero in every layer: kept
    dejavu = {k: {**v, "predictor": {}} for k, v in chess.items()}
    assert drop_zero_points(dejavu) is dejavu  # its masks take their shape from o_in
    del chess["layers_0"]["masks"]

    gen = Generator(config, params)
    put = gen._put_thresholds(chess)  # what the compiled prefill and loop are given
    assert all(sorted(layer) == ["gate"] for layer in put.values())
    got = gen.generate_ids([[5, 6, 7, 8]], max_new_tokens=4, thresholds=chess, stop_at_eos=False)
    assert sorted(got.measured_sparsity) == ["down_in", "gate"]  # what the gate zeroes
    want = decode_logits(config, params, Kernels(), chess, jnp.asarray([[5, 6, 7, 8]]), 3)
    assert got.tokens[0][1:] == [int(t) for t in np.argmax(want[:, 0], -1)]


def test_stops_at_eos():
    config = tiny(eos_token_ids=(7,))
    params = init_params(config)
    gen = Generator(config, params)
    first = gen.generate_ids([[3, 4, 5]], max_new_tokens=6, stop_at_eos=False).tokens[0]
    eos = first[2]
    gen = Generator(tiny(eos_token_ids=(eos,)), params)
    got = gen.generate_ids([[3, 4, 5]], max_new_tokens=6).tokens[0]
    assert got == first[: first.index(eos)]


def test_sampling_seeded_and_filtered():
    logits = jax.random.normal(jax.random.key(0), (4, 50)) * 3
    key = jax.random.key(1)
    greedy = sample_logits(logits, key, 0.0, 0, 1.0)
    np.testing.assert_array_equal(greedy, jnp.argmax(logits, -1))
    a = sample_logits(logits, key, 1.0, 0, 1.0)
    b = sample_logits(logits, key, 1.0, 0, 1.0)
    np.testing.assert_array_equal(a, b)
    top2 = jnp.argsort(-logits, axis=-1)[:, :2]
    for seed in range(20):
        s = sample_logits(logits, jax.random.key(seed), 5.0, 2, 1.0)
        assert all(int(s[i]) in top2[i].tolist() for i in range(4))
    # A tiny top_p keeps only the most likely token, whatever the temperature.
    for seed in range(5):
        s = sample_logits(logits, jax.random.key(seed), 5.0, 0, 1e-4)
        np.testing.assert_array_equal(s, greedy)
    # The static modes compute the same as the run-time choice.
    np.testing.assert_array_equal(sample_logits(logits, key, 0.0, 0, 1.0, mode="greedy"), greedy)
    np.testing.assert_array_equal(sample_logits(logits, key, 1.0, 0, 1.0, mode="sample"), a)
    np.testing.assert_array_equal(
        sample_logits(logits, key, 5.0, 2, 0.9, mode="filtered"),
        sample_logits(logits, key, 5.0, 2, 0.9),
    )


def test_bad_arguments():
    config = tiny()
    gen = Generator(config, init_params(config))
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen.generate_ids([[1]], max_new_tokens=0)
    with pytest.raises(ValueError, match="at least one token"):
        gen.generate_ids([[]])
    assert bucket_length(1) == 16 and bucket_length(17) == 32 and bucket_length(32) == 32


def _generate_both(config, params, kernels, thresholds):
    """Five greedy tokens for two prompts of different lengths, through `kernels` and
    through the masked dense XLA path: (got, dense) `Generator` results."""
    prompts = [[5, 6, 7, 8], [9, 10]]
    kw = {"max_new_tokens": 5, "thresholds": thresholds, "stop_at_eos": False}
    dense = Generator(config, params).generate_ids(prompts, **kw)
    got = Generator(config, params, kernels=kernels).generate_ids(prompts, **kw)
    return got, dense


@pytest.mark.slow  # 20-50 s each on 2 cores: the kernels run in interpret mode
@pytest.mark.parametrize(
    "method,impl",
    [
        ("chess", GPU_IMPL),
        ("chess+", "tpu_interpret"),
        ("teal", GPU_IMPL),
        ("teal", "tpu_interpret"),
    ],
)
def test_kernel_decoding_gives_masked_dense_tokens(method, impl):
    """Sparse decoding through the Pallas kernels (`GPU_IMPL`, or TPU's interpreter) gives
    the masked dense XLA path's logits and tokens, for a batch of prompts of different lengths.
    The random thresholds of q_in and kv_in differ, so q/k/v must not be fused (a fused
    matmul reads k/v from the q input, ignoring kv_in); equal ones may be."""
    from jaxsparse.registry import kernels_for_method

    config = tiny(intermediate_size=96)
    params = jax.tree.map(lambda x: x * 10, init_params(config, seed=2))
    thresholds = random_thresholds(config, jax.random.key(4), scale=0.3)
    kernels = kernels_for_method(method, "pallas", impl, thresholds=thresholds)
    assert not kernels.fuse_qkv and kernels.fuse_kv
    same = {k: {**v, "kv_in": v["q_in"]} for k, v in thresholds.items()}
    assert kernels_for_method(method, "pallas", impl, thresholds=same).fuse_qkv == (
        method != "chess+"
    )
    prompts = [[5, 6, 7, 8], [9, 10]]
    dense = Generator(config, params).generate_ids(
        prompts, max_new_tokens=6, thresholds=thresholds, stop_at_eos=False
    )
    kern = Generator(config, params, kernels=kernels)
    got = kern.generate_ids(prompts, max_new_tokens=6, thresholds=thresholds, stop_at_eos=False)
    assert got.tokens == dense.tokens
    assert got.measured_sparsity["gate"] == pytest.approx(dense.measured_sparsity["gate"])
    assert got.measured_sparsity["kv_in"] == pytest.approx(dense.measured_sparsity["kv_in"])
    assert 0.1 < dense.measured_sparsity["down_in"] < 0.95  # the thresholds did zero things
    assert dense.measured_sparsity["kv_in"] != pytest.approx(dense.measured_sparsity["q_in"])
    prompt = jnp.asarray([[5, 6, 7, 8], [9, 10, 11, 12]])
    want = decode_logits(config, params, Kernels(), thresholds, prompt, 3)
    have = decode_logits(config, params, kernels, thresholds, prompt, 3)
    np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_compact_points_follow_the_target_sparsity():
    """From `COMPACT_FROM_SPARSITY` on, the sparse-input points (not CHESS's gate, which
    `gated_matvec` runs) read lists of active rows; below it, or with no sparsity given,
    none do."""
    from jaxsparse.generate import default_kernels
    from jaxsparse.registry import COMPACT_FROM_SPARSITY, KERNEL_POINTS, kernels_for_method

    teal = KERNEL_POINTS["teal"]
    assert kernels_for_method("teal", sparsity=0.9).compact_points == teal
    assert kernels_for_method("teal", sparsity=COMPACT_FROM_SPARSITY).compact_points == teal
    assert kernels_for_method("chess", sparsity=0.7).compact_points == ("down_in",)
    assert kernels_for_method("teal", sparsity=0.6).compact_points == ()
    assert kernels_for_method("teal", sparsity=0.5).compact_points == ()
    assert kernels_for_method("teal").compact_points == ()
    assert default_kernels("teal", 1, "pallas", sparsity=0.9).compact_points == teal
    with pytest.raises(ValueError, match="kernel points"):
        Kernels("pallas", compact_points=("nope",))


@pytest.mark.slow  # ~30 s on 2 cores: the kernels run in interpret mode
@pytest.mark.parametrize("method", ["teal", "chess"])
def test_compacted_rows_decode_gives_masked_dense_tokens(method):
    """A decode step whose matvecs read lists of active rows (`Kernels.compact_points`,
    GPU kernels in interpret mode) gives the masked dense XLA path's tokens and logits;
    the step does run the list and compacted kernels."""
    from jaxsparse.models import init_cache, prepare_params
    from jaxsparse.registry import kernels_for_method

    config = tiny(intermediate_size=96)
    params = jax.tree.map(lambda x: x * 10, init_params(config, seed=2))
    thresholds = random_thresholds(config, jax.random.key(4), scale=0.6)
    kernels = kernels_for_method(method, "pallas", GPU_IMPL, thresholds, sparsity=0.9)
    assert "down_in" in kernels.compact_points
    got, dense = _generate_both(config, params, kernels, thresholds)
    assert got.tokens == dense.tokens
    assert got.measured_sparsity["down_in"] == pytest.approx(dense.measured_sparsity["down_in"])
    assert 0.3 < dense.measured_sparsity["down_in"] < 1.0  # the thresholds did zero things
    prompt = jnp.asarray([[5, 6, 7, 8], [9, 10, 11, 12]])
    want = decode_logits(config, params, Kernels(), thresholds, prompt, 2)
    have = decode_logits(config, params, kernels, thresholds, prompt, 2)
    np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    if method == "teal":  # each call its own target (`compacted_input_matvec`)
        alone = dataclasses.replace(kernels, shared_accumulator=False)
        have = decode_logits(config, params, alone, thresholds, prompt, 2)
        np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # the step runs the compacted kernels (by their names in its jaxpr)
    model, p = build_model(config, kernels), prepare_params(params, config, kernels)
    b = 1
    step = jax.make_jaxpr(lambda p, *a: model.apply({"params": p}, *a))(
        p,
        jnp.zeros((b, 1), jnp.int32),
        jnp.full((b, 1), 4),
        init_cache(config, b, 8),
        4,
        thresholds,
    )
    text = str(step)
    assert "compact_rows" in text and "compacted_matvec" in text


def _dot_inputs(jaxpr, weight_shapes: dict) -> list[tuple[str, object]]:
    """(name, lhs var) of each dot_general in the blocks' jaxprs whose weight (rhs) shape
    is one of `weight_shapes` ({shape: name})."""
    out = []
    for block in block_jaxprs(jaxpr):
        for e in block.eqns:
            if e.primitive.name != "dot_general":
                continue
            shape = tuple(e.invars[1].aval.shape)
            if shape in weight_shapes:
                out.append((weight_shapes[shape], e.invars[0]))
    return out


def test_xla_decode_runs_q_and_kv_on_one_stacked_input():
    """chess+ in an XLA decode step (what `--kernels auto` runs from batch 2 on): q_proj
    and kv_proj read one [B, 2, d] input (the q input, then the k/v input), so XLA can run
    them as one GEMM (`attention._stacked_q_kv_input`). The logits are those of the unstacked
    matmuls, and the prefill (many tokens) keeps two inputs."""
    from jaxsparse.models import init_cache, prepare_params
    from jaxsparse.registry import kernels_for_method

    # every projection's weight of its own shape (q [32, 64], k|v [32, 32], o [64, 32])
    config = tiny(intermediate_size=96, head_dim=16, num_kv_heads=1)
    params = jax.tree.map(lambda x: x * 10, init_params(config, seed=2))
    thresholds = random_thresholds(config, jax.random.key(4), scale=0.3)
    kernels = kernels_for_method("chess+", "xla", thresholds=thresholds)
    assert kernels.fuse_kv and not kernels.fuse_qkv
    prompt = jnp.asarray([[5, 6, 7, 8], [9, 10, 11, 12]])
    want = decode_logits(config, params, Kernels(), thresholds, prompt, 3)  # q, k, v apart
    have = decode_logits(config, params, kernels, thresholds, prompt, 3)
    np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())

    model = build_model(config, kernels)
    p = prepare_params(params, config, kernels)
    d = config.hidden_size
    weights = {(d, config.q_dim): "q", (d, 2 * config.kv_dim): "kv"}
    assert len(weights) == 2 and (config.q_dim, d) not in weights
    for t, stacked in ((1, True), (4, False)):
        tok, pos = jnp.ones((2, t), jnp.int32), jnp.broadcast_to(jnp.arange(t), (2, t))
        jaxpr = jax.make_jaxpr(
            lambda p, tok, pos, th: model.apply(
                {"params": p}, tok, pos, init_cache(config, 2, 8), 0, th
            )
        )(p, tok, pos, thresholds)
        dots = _dot_inputs(jaxpr.jaxpr, weights)
        assert [n for n, _ in dots] == ["q", "kv"] * config.num_layers
        lhs = [v for _, v in dots]
        for q_lhs, kv_lhs in zip(lhs[::2], lhs[1::2]):
            assert (q_lhs is kv_lhs) == stacked
            assert q_lhs.aval.shape[1] == (2 if stacked else t)
        # made by one select of the broadcast norm output, not by concatenating two inputs
        # (a kernel per layer on a GPU: benchmarks/NOTES_kernels.md)
        stacks = [
            e
            for b in block_jaxprs(jaxpr.jaxpr)
            for e in b.eqns
            if e.primitive.name == "concatenate" and tuple(e.outvars[0].aval.shape) == (2, 2, d)
        ]
        assert stacks == []


def _o_proj_source(jaxpr, o_shape) -> list[list[str]]:
    """Per block: what o_proj's input (the lhs of the dot with an `o_shape` weight) comes
    from, reshapes and converts skipped (`_source`)."""
    made_by = {v: e for b in block_jaxprs(jaxpr) for e in b.eqns for v in e.outvars}
    skip = ("reshape", "convert_element_type", "squeeze")
    return [_source(made_by, v, skip) for _, v in _dot_inputs(jaxpr, {o_shape: "o"})]


def _source(made_by: dict, v, skip) -> list[str]:
    """The op that made var `v` (`made_by`: var -> equation), looking through the
    primitives in `skip`: [a kernel's name] or [an XLA primitive]; [] for an input."""
    while v in made_by:
        p = made_by[v]
        names = pallas_calls_of(p)
        if names:
            return [names[0].removesuffix("_splitk")]
        if p.primitive.name not in skip:
            return [p.primitive.name]
        v = p.invars[0]
    return []


@pytest.mark.slow  # ~40 s on 2 cores: the attention kernel runs in interpret mode
def test_decode_attention_kernel_gives_xla_tokens_and_applies_o_in_threshold():
    """`Kernels(decode_attention=True)`: a decode step's attention runs through the
    attention kernel (every head), in an XLA step (what `--kernels auto` runs from batch
    2 on) and in a pallas one, with the logits, tokens and measured sparsity of XLA's
    attention. In the XLA step the kernel applies o_proj's input threshold to its output:
    o_proj reads the kernel's output, no select between them (a kernel of its own per
    layer on a GPU: benchmarks/NOTES_kernels.md). The prefill keeps XLA's attention. With
    the slots split over programs (`attention_splits`) the same logits and tokens."""
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match=r"attention_splits=.*\): use a positive int"):
            Kernels(decode_attention=True, attention_splits=bad)
    import dataclasses

    from jaxsparse.models import init_cache, prepare_params
    from jaxsparse.registry import kernels_for_method

    config = tiny(intermediate_size=96, head_dim=_head_dim(16), num_kv_heads=1)
    params = jax.tree.map(lambda x: x * 10, init_params(config, seed=2))
    thresholds = random_thresholds(config, jax.random.key(4), scale=0.3)
    # o_in thresholds that zero about half of the attention's output
    thresholds = {k: {**v, "o_in": v["o_in"] * 0 + 8.0} for k, v in thresholds.items()}
    prompt = jnp.asarray([[5, 6, 7, 8], [9, 10, 11, 12]])
    want = decode_logits(config, params, Kernels(), thresholds, prompt, 3)
    prompts = [[5, 6, 7, 8], [9, 10]]
    dense = Generator(config, params).generate_ids(
        prompts, max_new_tokens=5, thresholds=thresholds, stop_at_eos=False
    )
    assert 0.2 < dense.measured_sparsity["o_in"] < 0.9
    for mode, splits in (("xla", 1), ("pallas", 1), ("xla", 3), ("xla", None)):
        base = kernels_for_method("teal", mode, GPU_IMPL, thresholds=thresholds)
        kernels = dataclasses.replace(
            base, decode_attention=True, impl=GPU_IMPL, attention_splits=splits
        )
        have = decode_logits(config, params, kernels, thresholds, prompt, 3)
        np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
        got = Generator(config, params, kernels=kernels).generate_ids(
            prompts, max_new_tokens=5, thresholds=thresholds, stop_at_eos=False
        )
        assert got.tokens == dense.tokens
        for point, value in dense.measured_sparsity.items():
            assert got.measured_sparsity[point] == pytest.approx(value), (mode, point)

        model = build_model(config, kernels)
        p = prepare_params(params, config, kernels)
        o_shape = (config.q_dim, config.hidden_size)
        for t in (1, 4):
            tok, pos = jnp.ones((2, t), jnp.int32), jnp.broadcast_to(jnp.arange(t), (2, t))
            jaxpr = jax.make_jaxpr(
                lambda p, tok, pos, th, m=model: m.apply(
                    {"params": p}, tok, pos, init_cache(config, 2, 8), 0, th
                )
            )(p, tok, pos, thresholds).jaxpr
            calls = pallas_calls(jaxpr)
            # None: one range per 64 slots, so one for this 8-slot cache
            name = "head_sparse_attention" + ("_split" if (splits or 1) > 1 else "")
            n_attention = calls.count(name)
            assert n_attention == (config.num_layers if t == 1 else 0), (mode, t)
            if mode == "xla" and t == 1 and splits == 1:  # o_proj's input: the kernel's output
                want_src = [["head_sparse_attention"]] * config.num_layers
                assert _o_proj_source(jaxpr, o_shape) == want_src


@pytest.mark.parametrize("model_type", ["llama", "opt"])
def test_default_decode_attention_gives_xla_attention_tokens(model_type):
    """Dense decoding with the GPU defaults (here in the kernels' interpreter): the
    attention kernel runs every decode step (one launch per layer in the step's jaxpr)
    and gives the tokens and logits of XLA's attention, for Llama's GQA and OPT's MHA
    with biases and learned positions, over a cache longer than one 64-slot range. (Gemma
    3's sliding windows: tests/test_gemma3_methods.py.) The kernel takes q|k|v as the
    fused projection leaves them: no cache update and no RoPE around it in the step."""
    from jaxsparse.models import init_cache, prepare_params

    config = tiny(model_type, head_dim=_head_dim(16))
    params = jax.tree.map(lambda x: x * 4, init_params(config, seed=7))
    plain = Kernels(impl=GPU_IMPL, decode_attention=False)
    prompt = jnp.asarray([[5, 6, 7, 8], [9, 10, 11, 12]])
    want = decode_logits(config, params, plain, None, prompt, 3)
    prompts = [[5, 6, 7, 8, 9, 10, 11] * 7, [9, 10]]  # a 64-slot bucket + 8: two ranges
    ref = Generator(config, params, kernels=plain).generate_ids(
        prompts, max_new_tokens=8, stop_at_eos=False
    )
    tok, pos = jnp.ones((2, 1), jnp.int32), jnp.full((2, 1), 3)
    cache = (2, config.num_kv_heads, 128, config.head_dim)

    def step_ops(kn):  # the kernels, cache updates and RoPE's concatenates of a decode step
        m = build_model(config, kn)
        pk = prepare_params(params, config, kn)
        jaxpr = jax.make_jaxpr(
            lambda p: m.apply({"params": p}, tok, pos, init_cache(config, 2, 128), 3, None)
        )(pk).jaxpr
        ops = ops_outside_kernels(jaxpr)
        dus = sum(name == "dynamic_update_slice" and shape == cache for name, shape in ops)
        rope = sum(
            name == "concatenate" and len(shape) == 4 and shape[-1] == cache[-1]
            for name, shape in ops
        )
        return [n.removesuffix("_split") for n in pallas_calls(jaxpr)], dus, rope

    n = config.num_layers
    rope = 2 * n if model_type == "llama" else 0  # q's and k's per layer
    assert step_ops(plain) == ([], 2 * n, rope)
    # q/k/v apart (the kernel writes the cache; RoPE before it), fused (the dense decode
    # step's layout: the kernel reads q|k|v as the projection left them), and fused with
    # `packed_attention` off (as apart)
    for kernels, want_rope in (
        (Kernels(impl=GPU_IMPL), rope),
        (Kernels(impl=GPU_IMPL, fuse_qkv=True), 0),
        (Kernels(impl=GPU_IMPL, fuse_qkv=True, packed_attention=False), rope),
    ):
        have = decode_logits(config, params, kernels, None, prompt, 3)
        np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
        got = Generator(config, params, kernels=kernels).generate_ids(
            prompts, max_new_tokens=8, stop_at_eos=False
        )
        assert got.tokens == ref.tokens, kernels
        assert step_ops(kernels) == (["head_sparse_attention"] * n, 0, want_rope), kernels


def _method_step_setup(method: str, mode: str):
    """(config, params, thresholds, kernels) of a tiny model whose decode step runs
    `method` in `mode` through the GPU kernels' interpreter: K split over programs, a
    threshold per channel at every point (teal: q and k/v on one, so q|k|v is fused)."""
    import dataclasses

    from jaxsparse.registry import kernels_for_method

    config = tiny(hidden_size=128, intermediate_size=256, head_dim=_head_dim(16), num_heads=4)
    params = jax.tree.map(lambda x: x * 4, init_params(config, seed=5))
    thresholds = random_thresholds(config, jax.random.key(6), scale=0.3)
    if method == "teal":
        thresholds = {k: {**v, "kv_in": v["q_in"]} for k, v in thresholds.items()}
    kernels = dataclasses.replace(
        kernels_for_method(method, mode, GPU_IMPL, thresholds=thresholds),
        impl=GPU_IMPL,
    )
    return config, params, thresholds, kernels


@pytest.mark.slow  # 15-30 s each on 2 cores: every kernel runs in interpret mode
@pytest.mark.parametrize(
    "method,mode", [("teal", "pallas"), ("chess+", "pallas"), ("chess+", "xla")]
)
def test_packed_attention_reads_qkv_where_the_projections_left_them(method, mode):
    """A decode step whose attention kernel reads q, k and v where the projections left
    them (`head_sparse_attention_from_qkv`): teal's fused q|k|v and chess+'s q apart
    from k|v (one launch in a pallas step, one stacked GEMM in an XLA step), K split over
    programs (the block's float32 accumulator). It gives XLA's logits and tokens; the
    step runs no cache update and no RoPE outside the kernels; in a pallas step the
    attention kernel's first operand is the block's accumulator itself (no slice)."""
    from jaxsparse.models import init_cache, prepare_params

    config, params, thresholds, kernels = _method_step_setup(method, mode)
    assert kernels.fuse_qkv == (method == "teal") and kernels.decode_attention
    prompt = jnp.asarray([[5, 6, 7, 8], [9, 10, 11, 12]])
    want = decode_logits(config, params, Kernels(), thresholds, prompt, 3)
    have = decode_logits(config, params, kernels, thresholds, prompt, 3)
    np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    got, dense = _generate_both(config, params, kernels, thresholds)
    assert got.tokens == dense.tokens

    model, p = build_model(config, kernels), prepare_params(params, config, kernels)
    tok, pos = jnp.ones((2, 1), jnp.int32), jnp.full((2, 1), 3)
    jaxpr = jax.make_jaxpr(
        lambda p, th: model.apply({"params": p}, tok, pos, init_cache(config, 2, 64), 3, th)
    )(p, thresholds).jaxpr
    cache = (2, config.num_kv_heads, 64, config.head_dim)
    ops = ops_outside_kernels(jaxpr)
    assert not [o for o in ops if o == ("dynamic_update_slice", cache)]
    assert not [o for o in ops if o[0] == "concatenate" and len(o[1]) == 4]  # RoPE's
    firsts = []

    def walk(j):
        for e in j.eqns:
            if e.primitive.name == "pallas_call":
                if str(e.params.get("name")).startswith("head_sparse_attention"):
                    firsts.append(tuple(e.invars[0].aval.shape))
            else:
                for inner in sub_jaxprs(e):
                    walk(inner)

    walk(jaxpr)
    assert len(firsts) == config.num_layers
    if mode == "pallas":  # wider than q|k|v: the accumulator
        qkv = config.q_dim + 2 * config.kv_dim
        assert all(len(s) == 2 and s[1] > qkv for s in firsts), firsts


@pytest.mark.slow  # 20-40 s each on 2 cores: every kernel runs in interpret mode
@pytest.mark.parametrize("method", ["teal", "chess+", "chess"])
def test_fused_norms_give_xla_logits_with_no_norm_outside_kernels(method):
    """A pallas decode step with `Kernels.fused_norms` (the default): each block's two
    norms run as `residual_rms_norm` launches that also do the residual adds (reading
    o_proj's and down_proj's outputs in the block's accumulator) and the thresholds. It
    gives XLA's logits and tokens, and the unfused step's zero counts; its jaxpr has two
    norm kernels per block and no norm (rsqrt) or accumulator zero-fill outside kernels
    but the final norm's."""
    import dataclasses

    from jaxsparse.models import init_cache, prepare_params

    config, params, thresholds, fused = _method_step_setup(method, "pallas")
    assert fused.fused_norms
    plain = dataclasses.replace(fused, fused_norms=False)
    prompt = jnp.asarray([[5, 6, 7, 8], [9, 10, 11, 12]])
    want = decode_logits(config, params, Kernels(), thresholds, prompt, 3)
    have = decode_logits(config, params, fused, thresholds, prompt, 3)
    np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    prompts = [[5, 6, 7, 8], [9, 10]]
    runs = [
        Generator(config, params, kernels=kn).generate_ids(
            prompts, max_new_tokens=5, thresholds=thresholds, stop_at_eos=False
        )
        for kn in (Kernels(), plain, fused)
    ]
    assert runs[2].tokens == runs[0].tokens
    assert runs[2].measured_sparsity == pytest.approx(runs[1].measured_sparsity)

    tok, pos = jnp.ones((2, 1), jnp.int32), jnp.full((2, 1), 3)
    n = config.num_layers

    def step(kn):
        model, p = build_model(config, kn), prepare_params(params, config, kn)
        jaxpr = jax.make_jaxpr(
            lambda p, th: model.apply({"params": p}, tok, pos, init_cache(config, 2, 64), 3, th)
        )(p, thresholds).jaxpr
        ops = ops_outside_kernels(jaxpr)
        rsqrt = sum(name == "rsqrt" for name, _ in ops)
        # the block accumulators' fill (`layers._zeros`): float32, whole column blocks
        fills = sum(
            name == "broadcast_in_dim" and len(shape) == 2 and shape[1] % 512 == 0
            for name, shape in ops
        )
        calls = pallas_calls(jaxpr)
        return calls.count("residual_rms_norm"), rsqrt, fills, len(calls)

    norms, rsqrt, fills, launches = step(fused)
    assert (norms, rsqrt, fills) == (2 * n, 1, 0)
    norms0, rsqrt0, fills0, launches0 = step(plain)
    assert (norms0, rsqrt0) == (0, 2 * n + 1) and fills0 >= n
    assert launches == launches0 + 2 * n


@pytest.mark.slow  # about 20 s on 2 cores: every kernel runs in interpret mode
def test_fused_norms_add_biased_projections_outputs():
    """With q/k/v, o and MLP biases (Qwen2's q/k/v; o and MLP as in some Llama
    variants), o_proj's and down_proj's outputs reach the next norm's residual add as
    their own float32 arrays with the bias added (not the accumulator, which holds them
    without it): XLA's logits."""
    import dataclasses

    from jaxsparse.registry import kernels_for_method

    config = tiny(
        hidden_size=128,
        intermediate_size=256,
        head_dim=_head_dim(16),
        num_heads=4,
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
    )
    params = jax.tree.map(lambda x: x * 4, init_params(config, seed=5))
    key = jax.random.key(7)

    def biased(path, x):  # biases are initialized to zero: give them values
        if jax.tree_util.keystr(path).endswith("['bias']"):
            return 0.5 * jax.random.normal(jax.random.fold_in(key, x.size), x.shape, x.dtype)
        return x

    params = jax.tree_util.tree_map_with_path(biased, params)
    thresholds = random_thresholds(config, jax.random.key(6), scale=0.3)
    thresholds = {k: {**v, "kv_in": v["q_in"]} for k, v in thresholds.items()}
    kernels = dataclasses.replace(
        kernels_for_method("teal", "pallas", GPU_IMPL, thresholds=thresholds),
        impl=GPU_IMPL,
    )
    assert kernels.fused_norms
    prompt = jnp.asarray([[5, 6, 7, 8], [1, 2, 3, 4]])
    want = decode_logits(config, params, Kernels(), thresholds, prompt, 3)
    have = decode_logits(config, params, kernels, thresholds, prompt, 3)
    np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_decode_attention_is_the_gpu_default_with_slot_ranges_by_cache_length():
    """The attention kernel runs by default in a GPU decode step (or its interpreter),
    with one 64-slot range per program up to 16 ranges; XLA's attention elsewhere: the
    prefill, the CPU and TPU backends' reference/TPU impls, and heads narrower than the
    kernel's 16-wide tensor-core tiles on a real GPU."""
    gpu, interp = Kernels(impl="gpu"), Kernels(impl="gpu_interpret")
    assert gpu.decode_attention and gpu.attention_kernel(1, True, 128)
    assert interp.attention_kernel(1, True, 8)  # the interpreter has no tile limit
    assert not gpu.attention_kernel(1, True, 8)
    assert not gpu.attention_kernel(4, True, 128) and not gpu.attention_kernel(1, False, 128)
    assert not Kernels(impl="reference").attention_kernel(1, True, 128)
    assert not Kernels(impl="gpu", decode_attention=False).attention_kernel(1, True, 128)
    splits = {s: interp.attention_options(s)["num_splits"] for s in (8, 64, 65, 256, 1024, 4096)}
    assert splits == {8: 1, 64: 1, 65: 2, 256: 4, 1024: 16, 4096: 16}
    assert Kernels(impl="gpu", attention_splits=3).attention_options(4096) == {"num_splits": 3}
    assert Kernels(impl="reference").attention_options(256) == {}
    assert Kernels(impl="tpu_interpret").attention_options(256) == {}


def _gate_source(jaxpr) -> list[list[str]]:
    """For each gated_matvec call in a model's `jaxpr` (in each block's jaxpr, where each
    kernel is in its own jit), the primitives its gate input passes through on the way back
    from the op that made it, reshapes skipped, ending at that op: a kernel's name, or an
    XLA primitive."""
    out = []
    for block in block_jaxprs(jaxpr):
        out += _block_gate_source(block)
    return out


def _block_gate_source(jaxpr) -> list[list[str]]:
    made_by = {v: e for e in jaxpr.eqns for v in e.outvars}
    skip = ("reshape", "squeeze", "expand_dims")
    return [
        _source(made_by, e.invars[1], skip)
        for e in jaxpr.eqns
        if pallas_calls_of(e) == ["gated_matvec"]
    ]


@pytest.mark.parametrize("method,rule_in_kernel", [("chess", True), ("dejavu", False)])
def test_gate_rule_runs_inside_gated_matvec(method, rule_in_kernel):
    """In a CHESS decode step the gate kernel's float32 output goes straight into
    gated_matvec, which applies the activation and the threshold itself: no XLA kernel
    between the two (`llama._kernel_gate_rule`). Deja Vu's gate, a predicted mask, keeps
    its rule in XLA. (That the tokens stay those of masked dense: the test above.)"""
    from jaxsparse.models import init_cache, prepare_params
    from jaxsparse.registry import kernels_for_method

    config = tiny(intermediate_size=96)
    kernels = kernels_for_method(method, "pallas", "gpu_interpret")
    model = build_model(config, kernels)
    params = prepare_params(init_params(config, seed=2), config, kernels)
    m = config.intermediate_size
    th = {f"layers_{i}": {"gate": jnp.full((m,), 0.1)} for i in range(config.num_layers)}
    if method == "dejavu":
        th = {k: {**v, "masks": {"gate": jnp.ones((1, 1, m), bool)}} for k, v in th.items()}
    cache = init_cache(config, 1, 8)
    tok, pos = jnp.ones((1, 1), jnp.int32), jnp.full((1, 1), 3)
    jaxpr = jax.make_jaxpr(lambda p, t: model.apply({"params": p}, tok, pos, cache, 3, t))(
        params, th
    )
    sources = _gate_source(jaxpr.jaxpr)
    if rule_in_kernel:
        assert sources == [["sparse_input_matvec"]] * config.num_layers
    else:  # gate_proj and up_proj both run gated_matvec; up's gate comes out of XLA ops
        assert len(sources) == 2 * config.num_layers
        assert all(p[-1] not in ("sparse_input_matvec", "gated_matvec") for p in sources)


ATTN = "head_sparse_attention"
NORM = "residual_rms_norm"  # Kernels.fused_norms: each norm with its residual add


@pytest.mark.parametrize(
    "method,per_layer",
    [
        # the first norm, the attention (every decode step on a GPU), the second norm,
        # the dense gate (DENSE_KERNEL_POINTS), gated up, down
        ("chess", [NORM, ATTN, NORM, "sparse_input_matvec", "gated_matvec", "sparse_input_matvec"]),
        # q, k|v, the attention, o, then as chess
        (
            "chess+",
            [NORM]
            + ["sparse_input_matvec"] * 2
            + [ATTN, "sparse_input_matvec", NORM, "sparse_input_matvec"]
            + ["gated_matvec", "sparse_input_matvec"],
        ),
        # q|k|v, the attention, o, gate|up, down
        (
            "teal",
            [NORM, "sparse_input_matvec", ATTN, "sparse_input_matvec", NORM]
            + ["sparse_input_matvec"] * 2,
        ),
    ],
)
def test_decode_step_kernels_per_layer(method, per_layer):
    """Which projections a pallas decode step runs through the kernels: for CATS/CHESS the
    dense gate too (`jaxsparse.registry.DENSE_KERNEL_POINTS`: faster than XLA's fused GEMM
    in an H200 decode step), and the norms (`Kernels.fused_norms`), read off the step's
    jaxpr."""
    from jaxsparse.models import init_cache, prepare_params
    from jaxsparse.registry import kernels_for_method

    config = tiny(intermediate_size=96)
    kernels = kernels_for_method(method, "pallas", "gpu_interpret")
    model = build_model(config, kernels)
    params = prepare_params(init_params(config, seed=2), config, kernels)
    cache = init_cache(config, 1, 8)
    tok, pos = jnp.ones((1, 1), jnp.int32), jnp.full((1, 1), 3)
    jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, tok, pos, cache, 3, None))(params)
    names = [n.removesuffix("_splitk") for n in pallas_calls(jaxpr.jaxpr)]
    assert names == per_layer * config.num_layers


def _zero_fills(jaxpr, shapes: set | None = None) -> int:
    """Float32 [rows, columns] buffers broadcast from one scalar in `jaxpr` and its
    sub-jaxprs (not inside kernels): the split-K kernels' zeroed targets (a constant 0.0,
    or `SharedAccumulator`'s +-0.0 picked at run time). Their shapes go into `shapes`."""
    n = 0
    for e in jaxpr.eqns:
        if e.primitive.name == "pallas_call":
            continue
        out = e.outvars[0].aval if e.outvars else None
        if (
            e.primitive.name == "broadcast_in_dim"
            and out.ndim == 2
            and out.dtype == jnp.float32
            and e.invars[0].aval.ndim == 0
            and (
                not isinstance(e.invars[0], jax.extend.core.Literal)
                or float(e.invars[0].val) == 0.0
            )
        ):
            n += 1
            if shapes is not None:
                shapes.add(out.shape)
        n += sum(_zero_fills(inner, shapes) for inner in sub_jaxprs(e))
    return n


def _chained_calls(jaxpr) -> int:
    """The kernel calls in a block's `jaxpr` whose float32 accumulator (an operand passed
    through to an output of the same shape: `sparse_input_matvec_into`'s) comes from an
    earlier kernel call rather than from a fill."""
    made_by = {v: e for e in jaxpr.eqns for v in e.outvars}
    n = 0
    for e in jaxpr.eqns:
        if not pallas_calls_of(e):
            continue
        outs = {v.aval.shape for v in e.outvars if v.aval.dtype == jnp.float32}
        for v in e.invars:
            aval = getattr(v, "aval", None)
            if aval is None or aval.dtype != jnp.float32 or aval.ndim != 2:
                continue
            if aval.shape not in outs or v not in made_by:
                continue
            n += bool(pallas_calls_of(made_by[v]))
    return n


@pytest.mark.parametrize(
    "model_type,method,split,shared,unshared,launches,chained",
    # launches: the block's kernel calls, the decode attention kernel's included
    [
        ("llama", "teal", False, 1, 4, (5, 5), 3),  # q|k|v, o, gate|up, down
        ("llama", "teal", True, 3, 4, (5, 5), 1),  # [q|k|v, o], [gate|up], [down]
        # q and k|v (one launch), o, down share; the gate has its own
        ("llama", "chess+", False, 2, 5, (6, 7), 2),
        ("llama", "chess+", True, 3, 5, (6, 7), 1),  # [q, k|v, o], [gate], [down]
        ("llama", "chess", False, 2, 2, (4, 4), 0),  # the gate's own, and down's
        ("llama", "chess", True, 2, 2, (4, 4), 0),  # [gate], [down]
        ("opt", "teal", False, 1, 4, (5, 5), 3),  # q|k|v, o, fc1, fc2
        ("opt", "teal", True, 3, 4, (5, 5), 1),  # [q|k|v, o], [fc1], [fc2]
    ],
)
def test_decode_block_zeroes_one_shared_accumulator(
    model_type, method, split, shared, unshared, launches, chained
):
    """A pallas decode step on GPU zeroes one float32 buffer per block, which the block's
    split-K kernels add into side by side (`SharedAccumulator`), instead of one per call;
    CHESS's gate keeps its own (gated_matvec takes it whole), and chess+'s q and k|v run
    in one launch. With `Kernels.split_accumulator`, one buffer per part of the block
    (attention, the gate alone, up or gate|up, down), all of one shape. The logits stay
    those of `Kernels(shared_accumulator=False)`. `chained`: the kernel calls per block
    that add into a buffer an earlier call of the block has added into (split: only o
    after q|k|v)."""
    import dataclasses

    from jaxsparse.models import init_cache, prepare_params
    from jaxsparse.registry import kernels_for_method

    # every K > 64 (the kernel's K block), so that every sparse-input kernel splits K
    config = tiny(model_type, hidden_size=128, head_dim=32, intermediate_size=192)
    params = init_params(config, seed=2)
    thresholds = random_thresholds(config, jax.random.key(4), scale=0.03)
    if method != "chess+":  # one attention input, as calibration gives them: q|k|v fused
        thresholds = {k: {**v, "kv_in": v["q_in"]} for k, v in thresholds.items()}
    kernels = kernels_for_method(method, "pallas", "gpu_interpret", thresholds=thresholds)
    # the accumulators' own zero-fill; with fused norms the first norm's kernel makes them
    # (test_fused_norms_give_xla_logits_with_no_norm_outside_kernels)
    kernels = dataclasses.replace(kernels, split_accumulator=split, fused_norms=False)
    assert kernels.shared_accumulator
    apart = dataclasses.replace(kernels, shared_accumulator=False)
    cache = init_cache(config, 1, 8)
    tok, pos = jnp.ones((1, 1), jnp.int32), jnp.full((1, 1), 3)
    fills = []
    for kn in (kernels, apart):
        model = build_model(config, kn)
        p = prepare_params(params, config, kn)
        step = lambda p, t, model=model: model.apply({"params": p}, tok, pos, cache, 3, t)
        jaxpr = jax.make_jaxpr(step)(p, thresholds)
        blocks = block_jaxprs(jaxpr.jaxpr)
        shapes = set()
        fills.append([_zero_fills(b, shapes) for b in blocks])
        if split and kn.shared_accumulator:  # one shape, for one multi-output fusion
            assert len(shapes) == 1, shapes
        want = launches[0] if kn.shared_accumulator else launches[1]
        assert [len(pallas_calls(b)) for b in blocks] == [want] * config.num_layers
        if kn.shared_accumulator:
            assert [_chained_calls(b) for b in blocks] == [chained] * config.num_layers
    assert fills == [[shared] * config.num_layers, [unshared] * config.num_layers]
    prompt = jnp.asarray([[5, 6, 7, 8]])
    want = decode_logits(config, params, apart, thresholds, prompt, 2)
    have = decode_logits(config, params, kernels, thresholds, prompt, 2)
    np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def _thresholds_applied(jaxpr) -> int:
    """The thresholds a block's `jaxpr` applies in XLA: `abs(x) >= t` compares (those
    inside a pallas_call's kernel body are not in the block's own equations)."""
    made_by = {v: e for e in jaxpr.eqns for v in e.outvars}
    return sum(
        1
        for e in jaxpr.eqns
        if e.primitive.name == "ge"
        and e.invars[0] in made_by
        and made_by[e.invars[0]].primitive.name == "abs"
    )


@pytest.mark.parametrize(
    "method,mode,applied,kernel_thresholds",
    [
        ("teal", "xla", 4, 0),  # q|k|v (once for both), o, gate|up, down
        # down's; q|k|v's and the FFN input's in the norm kernels (`Kernels.fused_norms`),
        # o's in its kernel
        ("teal", "pallas", 1, 1),
        # q's in the norm kernel; o in its kernel; the gate's rule in gated_matvec, and
        # once more in XLA for the gate's statistics (unused here: XLA drops it)
        ("chess+", "pallas", 1, 1),
        ("chess+", "xla", 3, 0),  # q, o, the gate
    ],
)
def test_decode_block_applies_each_threshold_once(method, mode, applied, kernel_thresholds):
    """A decode step thresholds each input once. With q/k/v fused (TEAL) k/v read q's
    thresholded input, and `kv_in` is recorded from it, not thresholded a second time
    (a second consumer of the RMSNorm output, which kept XLA from fusing q's threshold
    into it: one more kernel per layer on an H200, benchmarks/NOTES_kernels.md). In a
    pallas step o_proj's kernel applies the `o_in` threshold itself. Logits, tokens and
    measured sparsity stay those of the masked dense path."""
    from jaxsparse.models import init_cache, prepare_params
    from jaxsparse.registry import kernels_for_method

    # o_proj's K (96) above the kernel's K block (64): it adds into the shared accumulator
    config = tiny(hidden_size=128, num_heads=6, head_dim=16, intermediate_size=192)
    params = init_params(config, seed=2)
    thresholds = random_thresholds(config, jax.random.key(4), scale=0.03)
    points = {"teal": ("q_in", "o_in", "ffn_in", "down_in"), "chess+": ("q_in", "o_in", "gate")}
    thresholds = {
        layer: {p: t[p] for p in points[method]}
        | ({"kv_in": t["q_in"]} if method == "teal" else {})
        for layer, t in thresholds.items()
    }
    kernels = kernels_for_method(method, mode, "gpu_interpret", thresholds=thresholds)
    assert kernels.fuse_qkv == (method == "teal")
    model = build_model(config, kernels)
    p = prepare_params(params, config, kernels)
    cache = init_cache(config, 1, 8)
    tok, pos = jnp.ones((1, 1), jnp.int32), jnp.full((1, 1), 3)
    step = lambda p, t: model.apply({"params": p}, tok, pos, cache, 3, t)
    blocks = block_jaxprs(jax.make_jaxpr(step)(p, thresholds).jaxpr)
    assert [_thresholds_applied(b) for b in blocks] == [applied] * config.num_layers
    with_t = [  # kernel calls given a threshold row: float32 [1, K] operands
        sum(
            1
            for e in b.eqns
            if pallas_calls_of(e)
            for v in e.invars
            if getattr(v, "aval", None) is not None
            and v.aval.dtype == jnp.float32
            and v.aval.shape == (1, config.q_dim)
        )
        for b in blocks
    ]
    assert with_t == [kernel_thresholds] * config.num_layers
    prompt = jnp.asarray([[5, 6, 7, 8]])
    want = decode_logits(config, params, Kernels(), thresholds, prompt, 2)
    have = decode_logits(config, params, kernels, thresholds, prompt, 2)
    np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    gen = Generator(config, params, kernels=kernels)
    got = gen.generate_ids([[5, 6, 7, 8]], max_new_tokens=5, thresholds=thresholds)
    ref = Generator(config, params).generate_ids(
        [[5, 6, 7, 8]], max_new_tokens=5, thresholds=thresholds
    )
    assert got.tokens == ref.tokens
    sparsified = set(thresholds["layers_0"]) | {"down_in"}  # a gate's zeros are down_in's
    assert set(got.measured_sparsity) == set(ref.measured_sparsity) == sparsified
    for point, v in ref.measured_sparsity.items():
        assert got.measured_sparsity[point] == pytest.approx(v), point
    assert 0.05 < got.measured_sparsity["o_in"] < 0.95


def _zero_counts_of(jaxpr) -> tuple[int, int]:
    """(zero masks a block's `jaxpr` returns, i.e. sows, and those of them made from an
    optimization barrier's output)."""
    made_by = {v: e for e in jaxpr.eqns for v in e.outvars}
    masks = [
        made_by[v]
        for v in jaxpr.outvars
        if v in made_by and v.aval.dtype == jnp.bool_ and made_by[v].primitive.name == "eq"
    ]
    behind = sum(
        1
        for e in masks
        if e.invars[0] in made_by and made_by[e.invars[0]].primitive.name == "optimization_barrier"
    )
    return len(masks), behind


@pytest.mark.parametrize(
    "method,masks,behind",
    [
        ("teal", 5, 5),  # q, kv (q's input: the same array), o, ffn, down
        ("chess", 2, 1),  # the gate (inside its fusion with up, no barrier) and down_in
    ],
)
def test_zero_counts_only_where_sparsified_and_read_behind_a_barrier(method, masks, behind):
    """The decode loop's zero counts: one mask per point the method sparsifies (chess's
    q/k/v, o and FFN inputs are dense: no mask), each made from the array its projection
    reads, kept as it is by an optimization barrier. Without the barrier XLA's GPU
    compiler fused the mask with the array's producer into the loop's count addition and
    recomputed SiLU(gate) * up there from the split-K partials (benchmarks/NOTES_kernels.md)."""
    from jaxsparse.models import init_cache

    config = tiny(intermediate_size=96)
    params = init_params(config, seed=2)
    full = random_thresholds(config, jax.random.key(4), scale=0.3)
    points = {"teal": ("q_in", "kv_in", "o_in", "ffn_in", "down_in"), "chess": ("gate",)}
    th = {layer: {p: t[p] for p in points[method]} for layer, t in full.items()}
    if method == "teal":
        th = {layer: {**t, "kv_in": t["q_in"]} for layer, t in th.items()}
    model = build_model(config)
    cache = init_cache(config, 1, 8)
    tok, pos = jnp.ones((1, 1), jnp.int32), jnp.full((1, 1), 3)
    step = lambda p, t: model.apply({"params": p}, tok, pos, cache, 3, t, mutable=["zeros"])
    blocks = block_jaxprs(jax.make_jaxpr(step)(params, th).jaxpr)
    assert [_zero_counts_of(b) for b in blocks] == [(masks, behind)] * config.num_layers
    (_, _), zeros = step(params, th)
    counted = {p for layer in zeros["zeros"].values() for m in layer.values() for p in m}
    assert counted == set(points[method]) | ({"down_in"} if method == "chess" else set())


def test_block_accumulator_parts_are_distinct_buffers_of_one_shape():
    """The parts of a block's split accumulator (`BlockAccumulators`) are zeroed together,
    all of one shape (so XLA can make them one multi-output fusion), by different
    expressions: identical ones would be merged into one buffer by XLA's
    common-subexpression elimination, and each in-place kernel call would then make XLA
    copy it. Checked on the optimized CPU HLO: each part stays a buffer of its own."""
    import re

    from jaxsparse.models.layers import SharedAccumulator
    from jaxsparse.registry import kernels_for_method

    config = tiny(hidden_size=128, head_dim=32, intermediate_size=192)
    kernels = kernels_for_method("chess+", "pallas", "gpu_interpret")
    assert kernels.split_accumulator
    x = jnp.ones((1, 1, config.hidden_size), jnp.float32)

    def parts(h):
        acc = SharedAccumulator.for_block(config, kernels, h)
        some = [p for p in (acc.attn, acc.gate, acc.ffn, acc.down) if p is not None]
        w = jnp.zeros((config.hidden_size, 8))
        some[0]._room([(h[:, 0], w)])  # the first call zeroes every part
        return [p.buf for p in some]

    bufs = parts(x)
    assert len(bufs) == 3  # attention, gate, down (chess+'s up runs in gated_matvec)
    assert len({b.shape for b in bufs}) == 1
    assert all(bool(jnp.all(b == 0)) for b in bufs)
    hlo = jax.jit(parts).lower(x).compile().as_text()
    # the entry's result: a tuple of distinct values, none a copy of another
    assert not re.search(r"= f32\[[0-9,]+\][^=]* copy\(", hlo), hlo


@pytest.mark.parametrize(
    "model_type,extra", [("llama", {}), ("qwen2", {"qkv_bias": True}), ("opt", {})]
)
def test_fused_qkv_layout_gives_the_same_logits(model_type, extra):
    """`prepare_params` with fuse_qkv (one q/k/v matmul) computes the same function."""
    from jaxsparse.models import Kernels, prepare_params

    config = tiny(model_type, **extra)
    params = init_params(config, seed=3)
    if extra.get("qkv_bias"):  # non-zero biases, so that their concatenation is checked
        params = jax.tree_util.tree_map_with_path(
            lambda p, x: x + 0.1 if "bias" in jax.tree_util.keystr(p) else x, params
        )
    tokens = jnp.asarray([[5, 6, 7, 8, 9]])
    pos = jnp.arange(5)[None]
    ref, _ = build_model(config).apply({"params": params}, tokens, pos)
    layouts = [
        (Kernels("xla", fuse_qkv=True), "self_attn", "qkv_proj", "k_proj"),
        (Kernels("xla", fuse_kv=True), "self_attn", "kv_proj", "k_proj"),
    ]
    if model_type != "opt":  # one gate|up matmul (TEAL's points: both read ffn_in)
        layouts.append((Kernels("xla", fuse_gate_up=True), "mlp", "gate_up_proj", "up_proj"))
    for kernels, module, name, gone in layouts:
        fused = prepare_params(params, config, kernels)
        assert name in fused["layers_0"][module]
        assert gone not in fused["layers_0"][module]
        got, _ = build_model(config, kernels).apply({"params": fused}, tokens, pos)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ the on-device loop


def per_step_reference(config, params, prompts, n, eos_ids=(), thresholds=None):
    """Greedy decoding the simple way: one jitted decode step per token, with the host
    reading every token and stopping rows at EOS (the loop `Generator` replaced). Returns
    (tokens per prompt, mean zero fraction per point over the decoded tokens)."""
    from jaxsparse.models import init_cache

    model = build_model(config)
    bucket = bucket_length(max(len(p) for p in prompts))
    b = len(prompts)
    tokens = np.zeros((b, bucket), np.int32)
    valid = np.zeros((b, bucket), bool)
    for i, p in enumerate(prompts):
        tokens[i, bucket - len(p) :] = p
        valid[i, bucket - len(p) :] = True
    pos = np.where(valid, np.cumsum(valid, 1) - 1, -1)
    step = jax.jit(
        lambda p, t, q, c, i, th: model.apply(
            {"params": p}, t, q, c, i, th, last_only=True, mutable=["stats"]
        )
    )
    (logits, cache), _ = step(params, tokens, pos, init_cache(config, b, bucket + n), 0, None)
    nxt = np.asarray(jnp.argmax(logits[:, -1], -1))
    out, done = [[int(t)] for t in nxt], np.isin(nxt, eos_ids)
    cur_pos, sums, count = valid.sum(1), {}, 0
    for k in range(1, n):
        if done.all():
            break
        (logits, cache), v = step(
            params, nxt[:, None], cur_pos[:, None], cache, bucket + k - 1, thresholds
        )
        for layer in v["stats"].values():
            for path, frac in jax.tree_util.tree_flatten_with_path(layer)[0]:
                point = str(path[-2].key)
                sums[point] = sums.get(point, 0.0) + float(np.sum(frac[:, -1] * ~done))
        count += int(np.sum(~done))
        nxt = np.asarray(jnp.argmax(logits[:, -1], -1))
        for i in range(b):
            if not done[i]:
                out[i].append(int(nxt[i]))
        done |= np.isin(nxt, eos_ids)
        cur_pos = cur_pos + 1
    out = [row[: next((j for j, t in enumerate(row) if t in eos_ids), len(row))] for row in out]
    stats = {p: v / count / config.num_layers for p, v in sums.items()} if count else {}
    return out, stats


def _eos_making(config, params, prompts, n):
    """An EOS id that the greedy run of `prompts` hits mid-way in some rows (not all)."""
    free, _ = per_step_reference(config, params, prompts, n)
    return free[0][n // 2]


@pytest.mark.parametrize(
    "model_type,extra",
    [("llama", {}), ("qwen2", {"qkv_bias": True}), ("mistral", {"sliding_window": 6}), ("opt", {})],
)
def test_loop_gives_the_per_step_tokens(model_type, extra):
    """The on-device loop gives the tokens of a per-step host loop: every family, a batch of
    mixed lengths, rows stopping at EOS at different steps."""
    config = tiny(model_type, **extra)
    params = jax.tree.map(lambda x: x * 10, init_params(config, seed=5))
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17, 3]]
    eos = _eos_making(config, params, prompts, 12)
    config = tiny(model_type, eos_token_ids=(eos,), **extra)
    want, _ = per_step_reference(config, params, prompts, 12, (eos,))
    assert any(len(w) < 12 for w in want)  # some row stopped at EOS
    got = Generator(config, params).generate_ids(prompts, max_new_tokens=12)
    assert got.tokens == want
    assert got.decode_tokens == sum(min(len(w) + 1, 12) - 1 for w in want)


def test_loop_measures_sparsity_over_every_decoded_token():
    """With a sparsity state, tokens and the measured zero fraction per point (averaged over
    every decoded token of every row) equal the per-step loop's."""
    config = tiny(intermediate_size=96)
    params = jax.tree.map(lambda x: x * 10, init_params(config, seed=2))
    th = random_thresholds(config, jax.random.key(4), scale=0.3)
    prompts = [[5, 6, 7, 8], [9, 10]]
    want, want_stats = per_step_reference(config, params, prompts, 9, (), th)
    got = Generator(config, params).generate_ids(prompts, 9, thresholds=th, stop_at_eos=False)
    assert got.tokens == want
    for point, v in want_stats.items():
        assert got.measured_sparsity[point] == pytest.approx(v, abs=1e-6)
    assert len(got.measured_sparsity_per_layer["gate"]) == config.num_layers
    assert got.measured_sparsity["gate"] > 0.1


def test_zero_counts_stack_layers_in_order():
    """The loop's zero counts: one [layers, B, width / run] array per point, layer i at
    index i, each entry the zeros of one run of channels, inactive rows not counted; a
    point in some layers only (or with another width) keeps the layers it covers in its
    key, and `_stats_layers` reads them back with the width."""
    from jaxsparse.generate import _stats_layers, _zero_counts

    B, L = 2, 3
    zeros = {}
    for i in range(L):  # layer i: the first i+1 channels of q_in are zero
        q = jnp.zeros((B, 1, 5), bool).at[:, :, : i + 1].set(True)
        zeros[f"layers_{i}"] = {"self_attn": {"q_in": (q,)}}
    zeros["layers_2"]["mlp"] = {"gate_rows": (jnp.ones((B, 1, 4), bool),)}
    zeros["layers_0"]["mlp"] = {"gate_rows": (jnp.ones((B, 1, 6), bool),)}
    active = jnp.array([True, False])
    out = _zero_counts(zeros, active, L)
    assert set(out) == {"q_in:5", "gate_rows:4@2", "gate_rows:6@0"}
    assert out["q_in:5"].shape == (L, B, 5) and out["q_in:5"].dtype == jnp.int32  # run 1
    for i in range(L):
        assert np.asarray(out["q_in:5"][i, 0]).tolist() == [1] * (i + 1) + [0] * (4 - i)
        assert not np.any(np.asarray(out["q_in:5"][i, 1]))  # the finished row counts nothing
    assert _stats_layers("q_in:5", L) == ("q_in", 5, [0, 1, 2])
    assert _stats_layers("gate_rows:4@2", L) == ("gate_rows", 4, [2])
    assert np.asarray(out["gate_rows:4@2"]).tolist() == [[[4], [0]]]  # one run of 4
    assert np.asarray(out["gate_rows:6@0"]).tolist() == [[[2, 2, 2], [0, 0, 0]]]  # runs of 2


@pytest.mark.parametrize(
    "width, groups, runs", [(4096, 1, 32), (576, 1, 9), (1536, 2, 12), (576, 2, 18), (100, 3, 25)]
)
def test_zero_counts_sum_runs_of_channels_within_one_device(width, groups, runs):
    """Each count sums one run of channels (128 where the width allows, a divisor of one
    device's share on a mesh), so the carried counts are width / run per row, and their
    sum is the number of zeros."""
    from jaxsparse.generate import _count_run, _zero_counts

    run = _count_run(width, groups)
    assert width // run == runs
    if width % groups == 0:
        assert (width // groups) % run == 0  # no run spans two devices' channels
    mask = jax.random.bernoulli(jax.random.key(width), 0.3, (2, 1, width))
    out = _zero_counts({"layers_0": {"mlp": {"down_in": (mask,)}}}, jnp.ones(2, bool), 1, groups)
    (counts,) = out.values()
    assert counts.shape == (1, 2, runs)
    want = np.asarray(mask[:, 0]).reshape(2, runs, run).sum(-1)
    np.testing.assert_array_equal(np.asarray(counts[0]), want)


def test_no_host_round_trip_per_token():
    """64 new tokens are one dispatch of the compiled loop and one host read, with no
    implicit transfer at all (the guard raises on any); streaming reads once per chunk."""
    config = tiny()
    gen = Generator(config, init_params(config))
    th = random_thresholds(config, jax.random.key(1), scale=0.01)
    gen.generate_ids([[3, 4]], max_new_tokens=64, thresholds=th, stop_at_eos=False)  # compile
    calls = []
    for sig, fn in list(gen._compiled.items()):

        def counted(*a, _fn=fn, _kind=sig[0]):
            calls.append(_kind)
            return _fn(*a)

        gen._compiled[sig] = counted
    with jax.transfer_guard("disallow"):
        r = gen.generate_ids([[3, 4]], max_new_tokens=64, thresholds=th, stop_at_eos=False)
    assert len(r.tokens[0]) == 64 and r.decode_steps == 63
    assert calls == ["prefill", "loop"] and r.host_reads == 1
    calls.clear()
    with jax.transfer_guard("disallow"):
        chunks = list(
            gen.stream_ids([[3, 4]], 64, thresholds=th, stop_at_eos=False, chunk_tokens=16)
        )
    assert calls == ["prefill"] + ["loop"] * 4  # 63 decode steps in chunks of 16
    assert chunks[-1][1].host_reads == 4
    assert sum(len(c[0][0]) for c in chunks[:-1]) == 64
    assert chunks[-1][1].tokens == r.tokens


def test_stream_yields_the_generated_text():
    """The streamed pieces add up to `generate`'s text; the last chunk carries the result."""
    config = tiny(eos_token_ids=(0,))
    params = jax.tree.map(lambda x: x * 10, init_params(config, seed=5))

    class CharTokenizer:  # one character per id: decode is a join, as simple as it gets
        eos_token_id = 0
        chat_template = None

        def __call__(self, text):
            return {"input_ids": [ord(c) % 90 + 5 for c in text]}

        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(33 + i) for i in ids)

    gen = Generator(config, params, CharTokenizer())
    texts, result = gen.generate(["abc", "hello"], max_new_tokens=20)
    chunks = list(gen.stream(["abc", "hello"], max_new_tokens=20, chunk_tokens=3))
    assert chunks[-1].result is not None and all(c.result is None for c in chunks[:-1])
    for i in range(2):
        assert "".join(c.texts[i] for c in chunks) == texts[i]
        assert [t for c in chunks for t in c.token_ids[i]] == result.tokens[i]
    assert chunks[-1].result.tokens == result.tokens


@pytest.mark.slow
def test_smollm2_loop_gives_the_per_step_tokens(smollm2):
    """SmolLM2, dense and with a CHESS state: the loop's greedy tokens are the per-step
    loop's, for a batch of two prompts of different lengths stopping at EOS."""
    from jaxsparse.calibrate import calibrate

    lm = smollm2
    prompts = [
        lm.tokenizer("The capital of France is")["input_ids"],
        lm.tokenizer('def fibonacci(n):\n    """Return the')["input_ids"],
    ]
    state = calibrate(
        lm.config,
        lm.params,
        lm.tokenizer,
        ["chess"],
        [0.5],
        None,
        tokens=256,
        seq_len=128,
        batch_size=2,
        progress=False,
    )[("chess", 0.5)]
    eos = tuple(sorted(Generator(lm.config, lm.params, lm.tokenizer).eos_ids))
    for th in (None, state.thresholds_for_model()):
        want, _ = per_step_reference(lm.config, lm.params, prompts, 16, eos, th)
        got = Generator(lm.config, lm.params, lm.tokenizer).generate_ids(prompts, 16, thresholds=th)
        assert got.tokens == want
        if th is not None:
            assert 0.3 < got.measured_sparsity["gate"] < 0.7


def test_fused_qkv_refused_for_different_q_and_kv_thresholds():
    """A state whose q_in and kv_in thresholds differ gets the unfused layout from
    `default_kernels` (what `jaxsparse generate` uses), decodes as masked dense XLA does, and a
    Generator built with fused q/k/v refuses it instead of applying q_in's threshold to k/v."""
    from jaxsparse.generate import default_kernels
    from jaxsparse.registry import kernels_for_method

    config = tiny()
    params = init_params(config, seed=2)
    th = jax.tree.map(np.asarray, random_thresholds(config, jax.random.key(5), scale=0.5))
    same = {k: {**v, "kv_in": v["q_in"]} for k, v in th.items()}
    assert default_kernels("teal", 1, "xla", same).fuse_qkv
    kernels = default_kernels("teal", 1, "xla", th)
    assert not kernels.fuse_qkv
    prompt = [[5, 6, 7, 8]]
    got = Generator(config, params, kernels=kernels).generate_ids(
        prompt, 6, thresholds=th, stop_at_eos=False
    )
    want = Generator(config, params).generate_ids(prompt, 6, thresholds=th, stop_at_eos=False)
    assert got.tokens == want.tokens
    assert got.measured_sparsity["kv_in"] == pytest.approx(want.measured_sparsity["kv_in"])
    fused = Generator(config, params, kernels=kernels_for_method("teal", "xla"))
    assert fused.kernels.fuse_qkv
    with pytest.raises(ValueError, match="q_in and kv_in different values"):
        fused.generate_ids(prompt, 6, thresholds=th, stop_at_eos=False)
    fused.generate_ids(prompt, 6, thresholds=same, stop_at_eos=False)  # equal: accepted


def test_auto_kernels_follow_the_recorded_crossover(monkeypatch):
    """`--kernels auto` on a GPU picks the sparse kernels at a batch size exactly when the
    committed kernel measurements (benchmarks/results/kernels_h200.json: device time of
    the kernel against XLA's dense matmul at 50%, both Llama-3-8B shapes) show them
    faster there; dense always runs XLA."""
    import json
    from pathlib import Path

    from jaxsparse.generate import default_kernels

    path = Path(__file__).resolve().parents[1] / "benchmarks/results/kernels_h200.json"
    rows = [
        r
        for r in json.loads(path.read_text())["rows"]
        if r["kernel"] == "sparse_input_matvec" and r["sparsity"] == 0.5
    ]
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    batches = sorted({r["batch"] for r in rows})
    assert batches == [1, 4, 8]
    for batch in batches:
        faster = all(r["device_speedup"] > 1.0 for r in rows if r["batch"] == batch)
        for method in ("chess", "teal"):
            mode = default_kernels(method, batch, "auto").mode
            assert mode == ("pallas" if faster else "xla"), (method, batch, faster)
        assert default_kernels("dense", batch, "auto").mode == "xla"


def test_auto_kernels_from_batch_2_follow_the_recorded_runs(monkeypatch):
    """From batch 2 on, `auto` picks the kernels (lists of active rows, the batch on the
    tensor cores) where the recorded runs found them faster than dense on an H200: teal at
    S=0.9 end to end at batches 4 and 8; not where the kernels alone were slower than
    XLA's matvec at batch 4 (S=0.7, and 0.5); never without a target sparsity, and never
    off a GPU."""
    import json
    from pathlib import Path

    from jaxsparse.generate import default_kernels

    results = Path(__file__).resolve().parents[1] / "benchmarks/results/compacted_rows_h200"
    runs = json.loads((results / "decode_s0.9_b48_pallas.json").read_text())["rows"]
    tok_s = {(r["method"], r["batch"]): r["generator_tokens_per_s_per_sequence"] for r in runs}
    kernels = json.loads((results / "compacted_matvec_b48_dot_h200.json").read_text())["rows"]
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    for batch in (4, 8):
        assert tok_s[("teal", batch)] > tok_s[("dense", batch)]
        kn = default_kernels("teal", batch, "auto", sparsity=0.9)
        assert kn.mode == "pallas" and kn.compact_points, batch
    for s in (0.5, 0.7):
        best = max(
            r["standalone_vs_dense"] for r in kernels if r["batch"] == 4 and r["sparsity"] == s
        )
        assert best < 1.0
        assert default_kernels("teal", 4, "auto", sparsity=s).mode == "xla", s
    assert default_kernels("teal", 4, "auto").mode == "xla"
    # chess's gated up projection and its dense gate input have no list path
    assert default_kernels("chess", 4, "auto", sparsity=0.9).mode == "xla"
    assert default_kernels("chess", 1, "auto", sparsity=0.9).mode == "pallas"
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert default_kernels("teal", 4, "auto", sparsity=0.9).mode == "xla"
