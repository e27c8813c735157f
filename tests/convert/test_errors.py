"""Bad inputs: each raises a clear error naming the file or tensor and the fix."""

from __future__ import annotations

import builtins
import json
import shutil

import numpy as np
import pytest

import convert
from convert import ConversionError, SourceError, read_model
from jaxsparse.cli import main
from jaxsparse.config import ConfigError
from jaxsparse.io import COMPLETE_MARKER, IncompleteDirectoryError, is_complete
from jaxsparse.loading import load_model

pytest.importorskip("torch")


@pytest.fixture
def llama_dir(tiny_hf_models, tmp_path):
    """A writable copy of the tiny untied Llama (safetensors)."""
    d = tmp_path / "llama"
    shutil.copytree(tiny_hf_models["llama"].safetensors_dir, d)
    return d


def rewrite_safetensors(directory, change):
    from safetensors.numpy import load_file, save_file

    path = directory / "model.safetensors"
    sd = load_file(path)
    change(sd)
    save_file(sd, path)


def test_unknown_architecture(llama_dir):
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "gpt_neox", ["GPTNeoXForCausalLM"]
    (llama_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ConfigError,
        match=r"config.json: unknown architecture "
        r"model_type='gpt_neox'.*supported: llama",
    ):
        read_model(llama_dir)


def _pop(name):
    return lambda sd: sd.pop(name)


def _zeros(name, shape):
    return lambda sd: sd.update({name: np.zeros(shape, np.float32)})


@pytest.mark.parametrize(
    "change, message",
    [
        (
            _pop("model.layers.1.mlp.up_proj.weight"),
            r"(?s)missing tensors \(1\): model.layers.1.mlp.up_proj.weight.*re-download",
        ),
        # an untied model without lm_head
        (_pop("lm_head.weight"), r"missing tensors \(1\): lm_head.weight"),
        (
            _zeros("model.layers.0.mlp.extra_proj.weight", (3, 3)),
            r"unexpected tensors \(1\): 'model.layers.0.mlp.extra_proj.weight' \(in model",
        ),
        (
            _zeros("model.layers.0.self_attn.k_proj.weight", (16, 64)),
            r"'model.layers.0.self_attn.k_proj.weight' in model.safetensors: "
            + r"expected shape \(32, 64\), found \(16, 64\)",
        ),
    ],
    ids=["missing", "untied-without-lm-head", "unexpected", "misshaped"],
)
def test_a_bad_tensor_is_named(llama_dir, change, message):
    """A missing, unexpected or misshaped tensor: named, with the shapes and the fix."""
    rewrite_safetensors(llama_dir, change)
    with pytest.raises(ConversionError, match=message):
        read_model(llama_dir)


def test_truncated_safetensors(llama_dir):
    f = llama_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(
        SourceError,
        match=r"model.safetensors: truncated or corrupt .*tensor"
        r".*re-download",
    ):
        read_model(llama_dir)
    f.write_bytes(b"\x00" * 5)
    with pytest.raises(SourceError, match=r"model.safetensors: truncated or corrupt"):
        read_model(llama_dir)


def test_truncated_and_sharded_bin(tiny_hf_models, tmp_path):
    d = tmp_path / "bin"
    shutil.copytree(tiny_hf_models["opt"].bin_dir, d)
    f = d / "pytorch_model.bin"
    f.write_bytes(f.read_bytes()[:3000])
    with pytest.raises(
        SourceError,
        match=r"pytorch_model.bin: cannot read the PyTorch "
        r"checkpoint.*truncated or corrupt",
    ):
        read_model(d)


def test_bin_without_torch_says_how_to_install_it(tiny_hf_models, monkeypatch):
    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(
        SourceError,
        match=r"pytorch_model.bin: reading PyTorch .bin "
        r"checkpoints needs torch; `pip install torch`",
    ):
        read_model(tiny_hf_models["llama"].bin_dir)


def test_missing_shard_is_named(tiny_hf_models, tmp_path):
    d = tmp_path / "sharded"
    tiny_hf_models["qwen2"].torch_model.save_pretrained(d, max_shard_size="20KB")
    victim = sorted(d.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(
        SourceError, match=f"{victim.name}: shard listed in .*index.json is missing"
    ):
        read_model(d)


def test_not_a_model(tmp_path):
    with pytest.raises(ConversionError, match=r"neither an HF model directory"):
        read_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        read_model(tmp_path / "nothing-here")


def test_existing_output_needs_overwrite(tiny_hf_models, tmp_path, capsys):
    src = str(tiny_hf_models["opt_proj"].safetensors_dir)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("old")
    assert main(["convert", src, str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxsparse convert: error: ")
    assert f"{out} already exists; pass --overwrite" in err
    assert (out / "keep").read_text() == "old"
    assert main(["convert", src, str(out), "--overwrite", "--dtype", "bfloat16"]) == 0
    assert not (out / "keep").exists() and is_complete(out)
    assert load_model(out).config.dtype == "bfloat16"


@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_conversion_leaves_nothing_that_loads(
    tiny_hf_models, tmp_path, monkeypatch, existing
):
    import orbax.checkpoint as ocp

    import jaxsparse.io

    src = tiny_hf_models["qwen2"].safetensors_dir
    out = tmp_path / "out"
    if existing:
        convert.convert(src, out, progress=False)
        old = load_model(out).params
    real_save = ocp.StandardCheckpointer.save

    def save_then_die(self, path, *args, **kwargs):  # the params are written, then Ctrl-C
        real_save(self, path, *args, **kwargs)
        self.wait_until_finished()
        raise KeyboardInterrupt

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        convert.convert(src, out, overwrite=True, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == (["out"] if existing else [])
    # Killed outright (no cleanup): the half-written temporary is left, and refused.
    monkeypatch.setattr(jaxsparse.io, "_remove", lambda p: None)
    with pytest.raises(KeyboardInterrupt):
        convert.convert(src, out, overwrite=True, progress=False)
    monkeypatch.undo()
    (leftover,) = [p for p in tmp_path.iterdir() if p.name != "out"]
    assert leftover.name.startswith(".out.tmp-")
    with pytest.raises(IncompleteDirectoryError, match="incomplete.*re-run the conversion"):
        load_model(leftover)
    assert out.exists() == existing
    if existing:
        assert (out / COMPLETE_MARKER).is_file()
        new = load_model(out).params
        assert all(
            np.array_equal(a, b) for a, b in zip(jax_leaves(old), jax_leaves(new), strict=True)
        )


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]
