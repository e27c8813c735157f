"""The public API listed in jaxsparse/__init__.py: every name of `__all__` resolves, to the
object its module defines; importing the package imports no JAX (the names load on first
use); `jaxsparse.calibrate` is the function even after the submodule of that name was
imported. Each check runs in a fresh interpreter, so that the import order is the one
the test sets up."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
API = {
    "Evaluator": "jaxsparse.evaluate",
    "Generator": "jaxsparse.generate",
    "SamplingParams": "jaxsparse.generate",
    "calibrate": "jaxsparse.calibrate",
    "enable_compilation_cache": "jaxsparse.compilation_cache",
    "load_model": "jaxsparse.loading",
    "load_state": "jaxsparse.sparsity",
}


def run(code: str) -> dict:
    """`code` (which prints one JSON line last) in a fresh interpreter, from the repo root."""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_is_light_and_all_lists_the_api():
    got = run(
        "import json, sys, jaxsparse\n"
        "print(json.dumps({'file': jaxsparse.__file__, 'all': jaxsparse.__all__,"
        " 'jax': 'jax' in sys.modules, 'dir': sorted(set(jaxsparse.__all__) - set(dir(jaxsparse)))}))"
    )
    assert Path(got["file"]) == ROOT / "jaxsparse" / "__init__.py"  # a regular package
    assert got["all"] == sorted(API)
    assert not got["jax"], "import jaxsparse imported jax: the names must load lazily"
    assert got["dir"] == []


def test_every_name_is_its_modules_object():
    got = run(
        "import importlib, json, jaxsparse\n"
        f"api = {API!r}\n"
        "print(json.dumps({n: getattr(jaxsparse, n) is getattr(importlib.import_module(m), n)"
        " for n, m in api.items()}))"
    )
    assert got == dict.fromkeys(API, True)


def test_calibrate_is_the_function_after_its_submodule_is_imported():
    got = run(
        "import json, types, jaxsparse.calibrate\n"
        "import jaxsparse\n"
        "from jaxsparse import calibrate\n"
        "from jaxsparse.calibrate import calibrate as fn\n"
        "print(json.dumps([jaxsparse.calibrate is fn, calibrate is fn,"
        " isinstance(jaxsparse.calibrate, types.FunctionType)]))"
    )
    assert got == [True, True, True]


def test_unknown_names_raise_attribute_error():
    got = run(
        "import json, jaxsparse\n"
        "try:\n    jaxsparse.Generatr\n    r = 'no error'\n"
        "except AttributeError as e:\n    r = str(e)\n"
        "print(json.dumps(r))"
    )
    assert got == "module 'jaxsparse' has no attribute 'Generatr'"
