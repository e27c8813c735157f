"""JAX's compiled programs kept on disk (`jaxsparse.enable_compilation_cache`): by every
`jaxsparse` command but convert, and by scripts and notebooks that call it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Run in a fresh interpreter: the cache directory is process-wide JAX state.
SCRIPT = """
import jax, jax.numpy as jnp
from jaxsparse import enable_compilation_cache  # the public name; commands call it too
print("DIR", enable_compilation_cache())
print(float(jax.jit(lambda x: jnp.sin(x) * 3 + 1)(jnp.float32(2.0))))
"""


def _run(tmp_path: Path, **env_extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.pop("JAXSPARSE_XLA_CACHE", None)
    env.update(
        JAXSPARSE_CACHE=str(tmp_path / "cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",  # cache even this tiny program
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
        **env_extra,
    )
    return subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=tmp_path,  # a relative directory, were one made, lands here
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _dir(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 0, out.stderr
    return next(line[4:] for line in out.stdout.splitlines() if line.startswith("DIR "))


def test_default_cache_is_under_the_model_cache_and_fills(tmp_path):
    out = _run(tmp_path)
    want = tmp_path / "cache" / "xla"
    assert _dir(out) == str(want)
    assert any(want.iterdir()), "the compiled program was not written to the cache"


@pytest.mark.parametrize("setting", ["off", "OFF", "0"])
def test_off_turns_it_off(tmp_path, setting):
    out = _run(tmp_path, JAXSPARSE_XLA_CACHE=setting)
    assert _dir(out) == "None"
    assert not (tmp_path / "cache" / "xla").exists()


def test_a_given_directory_wins(tmp_path):
    mine = tmp_path / "mine"
    assert _dir(_run(tmp_path, JAXSPARSE_XLA_CACHE=str(mine))) == str(mine)
    assert any(mine.iterdir())
    jax_own = tmp_path / "jax_own"  # JAX's own setting is kept when ours is not set
    assert _dir(_run(tmp_path, JAX_COMPILATION_CACHE_DIR=str(jax_own))) == str(jax_own)


def test_a_cache_that_cannot_be_made_only_warns(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    out = _run(tmp_path, JAXSPARSE_XLA_CACHE=str(blocker / "xla"))
    assert _dir(out) == "None"
    assert "JAXSPARSE_XLA_CACHE" in out.stderr and "cannot create" in out.stderr


def test_commands_turn_it_on_and_convert_does_not(monkeypatch, tmp_path):
    from jaxsparse.cli import common, run_command

    calls = []
    monkeypatch.setattr(common, "enable_compilation_cache", lambda: calls.append(1))
    missing = str(tmp_path / "missing.gguf")
    assert run_command("generate", ["--model", missing, "--prompt", "x"]) == 2
    assert calls == [1]
    assert run_command("convert", [missing, str(tmp_path / "out")]) == 2
    assert calls == [1]
