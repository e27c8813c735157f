"""`ruff check` and `ruff format --check` are clean, with the ruff version the test extra
pins in pyproject.toml (so that `make test`, and CI through it, runs the same rules)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATHS = ["jaxsparse", "pallas_kernels", "convert", "tests", "benchmarks"]


def ruff() -> list[str]:
    exe = Path(sys.executable).with_name("ruff")
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("ruff")
    if found is None:
        pytest.fail("ruff is not installed: pip install -e '.[test]' (it pins ruff)")
    return [found]


def pinned_version() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(r'"ruff==([0-9.]+)"', text)
    assert m, "pyproject.toml's test extra must pin ruff (ruff==X.Y.Z)"
    return m.group(1)


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*ruff(), *args], cwd=ROOT, capture_output=True, text=True, check=False)


def test_ruff_is_the_pinned_version():
    out = run("--version").stdout.split()
    assert out[-1] == pinned_version(), f"ruff {out[-1]} installed, {pinned_version()} pinned"


def test_ruff_check_is_clean():
    r = run("check", "--no-cache", *PATHS)
    assert r.returncode == 0, r.stdout + r.stderr


def test_ruff_format_is_clean():
    r = run("format", "--check", "--no-cache", *PATHS)
    assert r.returncode == 0, r.stdout + r.stderr
