"""Checkpoint save/load (orbax) and the atomic directory writes under it."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxsparse.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_config,
    save_checkpoint,
)
from jaxsparse.config import ModelConfig
from jaxsparse.io import COMPLETE_MARKER, IncompleteDirectoryError, atomic_directory
from jaxsparse.models import param_shapes

TINY = {
    "vocab_size": 67,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "head_dim": 8,
}


def tiny_config(dtype="float32", **kw) -> ModelConfig:
    return ModelConfig(model_type="llama", **TINY, dtype=dtype, **kw)


def init_params(config: ModelConfig, seed: int = 0) -> dict:
    """Random params of the right shapes and dtype (numpy: `models.init_params` is slow eagerly)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), param_shapes(config))


def assert_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_gives_identical_arrays(tmp_path, dtype):
    config = tiny_config(
        dtype, qkv_bias=True, rope_scaling=(("factor", 2.0), ("rope_type", "linear"))
    )
    params = init_params(config, seed=3)
    save_checkpoint(tmp_path / "ck", config, params, source={"path": "somewhere"})
    got_config, got, tokenizer, source = load_checkpoint(tmp_path / "ck")
    assert got_config == config and load_config(tmp_path / "ck") == config
    assert tokenizer is None and source == {"path": "somewhere"}
    assert_identical(got, params)
    assert {str(x.dtype) for x in jax.tree.leaves(got)} == {dtype}


def test_load_into_a_sharding(tmp_path):
    config = tiny_config()
    params = init_params(config)
    save_checkpoint(tmp_path / "ck", config, params)
    dev = jax.devices()[-1]
    one = jax.sharding.SingleDeviceSharding(dev)
    _, got, _, _ = load_checkpoint(tmp_path / "ck", sharding=one)
    assert all(x.sharding == one for x in jax.tree.leaves(got))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    _, got, _, _ = load_checkpoint(tmp_path / "ck", sharding=lambda path, shape: spec)
    assert all(x.sharding == spec for x in jax.tree.leaves(got))
    assert_identical(got, params)


def test_saving_params_that_do_not_match_the_config_is_refused(tmp_path):
    config = tiny_config()
    params = init_params(config)
    params["layers_0"]["mlp"]["up_proj"]["kernel"] = np.zeros((32, 5), np.float32)
    with pytest.raises(CheckpointError, match=r"layers_0.*up_proj.*\(32, 48\)"):
        save_checkpoint(tmp_path / "ck", config, params)
    assert not (tmp_path / "ck").exists()


def test_incomplete_checkpoint_is_refused(tmp_path):
    config = tiny_config()
    save_checkpoint(tmp_path / "ck", config, init_params(config))
    (tmp_path / "ck" / COMPLETE_MARKER).unlink()
    with pytest.raises(IncompleteDirectoryError, match=r"ck: incomplete .*re-run the conversion"):
        load_checkpoint(tmp_path / "ck")


def test_existing_checkpoint_needs_overwrite_and_is_replaced_whole(tmp_path):
    a, b = tiny_config(), tiny_config("bfloat16")
    save_checkpoint(tmp_path / "ck", a, init_params(a))
    with pytest.raises(FileExistsError, match=r"ck already exists; pass --overwrite"):
        save_checkpoint(tmp_path / "ck", b, init_params(b))
    save_checkpoint(tmp_path / "ck", b, init_params(b, seed=1), overwrite=True)
    assert load_config(tmp_path / "ck") == b
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporaries left


def test_atomic_directory_on_error_leaves_nothing_and_keeps_the_old(tmp_path):
    target = tmp_path / "state"
    with pytest.raises(RuntimeError, match="boom"), atomic_directory(target) as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(target) as tmp:
        (tmp / "v").write_text("1")
    with pytest.raises(KeyboardInterrupt), atomic_directory(target, overwrite=True) as tmp:
        (tmp / "v").write_text("2")
        raise KeyboardInterrupt
    assert (target / "v").read_text() == "1" and (target / COMPLETE_MARKER).is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["state"]


def test_saved_tokenizer_is_autotokenizers_without_importing_torch(smollm2, tmp_path):
    """`load_saved_tokenizer` builds the class `tokenizer_config.json` names, as AutoTokenizer
    does: the same tokenizer (type, ids, text, specials, chat template), without importing
    torch (AutoTokenizer does when torch is installed); a directory naming no exported class
    goes through AutoTokenizer."""
    import json
    import shutil
    import subprocess
    import sys

    from transformers import AutoTokenizer

    from jaxsparse.checkpoint import load_saved_tokenizer
    from jaxsparse.loading import default_checkpoint_path

    saved = default_checkpoint_path() / "tokenizer"
    texts = ["Hello world", "def f(x):\n\treturn x  # déjà vu <|im_end|>", " two  spaces"]
    chat = [{"role": "user", "content": "Name three prime numbers."}]

    def same(a, b):
        assert type(a) is type(b)
        assert [a(t)["input_ids"] for t in texts] == [b(t)["input_ids"] for t in texts]
        assert [a.decode(a(t)["input_ids"]) for t in texts] == [
            b.decode(b(t)["input_ids"]) for t in texts
        ]
        assert (a.all_special_ids, a.eos_token_id, a.pad_token_id, len(a)) == (
            b.all_special_ids,
            b.eos_token_id,
            b.pad_token_id,
            len(b),
        )
        assert a.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
            b.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        )

    auto = AutoTokenizer.from_pretrained(str(saved))
    same(load_saved_tokenizer(saved), auto)
    same(smollm2.tokenizer, auto)

    unnamed = tmp_path / "tokenizer"
    shutil.copytree(saved, unnamed)
    cfg = json.loads((unnamed / "tokenizer_config.json").read_text())
    cfg["tokenizer_class"] = "NoSuchTokenizerClass"
    (unnamed / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert load_saved_tokenizer(unnamed)(texts[1])["input_ids"] == auto(texts[1])["input_ids"]

    pytest.importorskip("torch")  # installed, so AutoTokenizer would import it
    probe = (
        "import sys; from jaxsparse.checkpoint import load_saved_tokenizer; "
        f"load_saved_tokenizer({str(saved)!r}); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_param_shapes_traced_once_per_config_and_kernels():
    """`param_shapes` and `logical_axes` share one traced init per (config, kernels), and
    each call returns its own tree: changing one does not change the next."""
    from jaxsparse.models import XLA, _boxed_shapes, logical_axes

    config = tiny_config().replace(num_kv_heads=1)  # a config no other test traced
    before = _boxed_shapes.cache_info()
    first = param_shapes(config)
    axes = logical_axes(config, XLA)
    second = param_shapes(config)
    after = _boxed_shapes.cache_info()
    assert (after.misses - before.misses, after.hits - before.hits) == (1, 2)
    assert jax.tree.structure(first) == jax.tree.structure(second)
    assert set(axes) == set(first)
    first["embed_tokens"] = None
    assert param_shapes(config)["embed_tokens"] == second["embed_tokens"] is not None


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text", "opt"])
def test_param_shapes_repeat_one_traced_block(family):
    """`_boxed_shapes` traces a one-layer init and repeats its block: the shapes, dtypes
    and logical axes equal a full init's, for every family (Gemma 3 with its sliding and
    global layers) and for the kernels' layout (q/k/v fused, up stored by rows)."""
    import flax.linen as nn

    from jaxsparse.config import FULL, SLIDING
    from jaxsparse.models import XLA, _boxed_shapes, _init
    from jaxsparse.registry import kernels_for_method

    config = tiny_config().replace(num_layers=3)
    if family == "qwen2":
        config = config.replace(model_type="qwen2", qkv_bias=True)
    elif family == "gemma3_text":
        config = config.replace(
            model_type="gemma3_text",
            sliding_window=4,
            layer_types=(SLIDING, FULL, SLIDING),
            rope_local_theta=100.0,
            tie_word_embeddings=True,
        )
    elif family == "opt":
        from tiny import OPT

        config = OPT.replace(num_layers=3)
    for kernels in (XLA, kernels_for_method("chess", "pallas", "gpu_interpret")):
        want = jax.eval_shape(lambda k=kernels: _init(config, jax.random.key(0), k))
        got = _boxed_shapes(config, kernels)
        assert list(got) == list(want)  # same keys, same order
        assert jax.tree.structure(nn.unbox(got)) == jax.tree.structure(nn.unbox(want))
        assert jax.tree.leaves(nn.unbox(got)) == jax.tree.leaves(nn.unbox(want))
        assert nn.get_partition_spec(got) == nn.get_partition_spec(want)
