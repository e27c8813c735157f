"""jaxsparse: activation-sparse LLM inference in JAX (docs/design.md).

The public API, importable from the package itself:

- `load_model(path=None, dtype=None)`: an HF directory or GGUF file (default: the
  embedded SmolLM2-135M-Instruct) as a `LoadedModel` (config, params, tokenizer).
- `calibrate(config, params, tokenizer, methods, sparsities, ...)`: sparsity states fitted
  on calibration text.
- `load_state(directory, config=None)`: a saved sparsity state.
- `Generator(config, params, tokenizer, ...)` and `SamplingParams`: decoding.
- `Evaluator`: perplexity and tasks with a state.
- `enable_compilation_cache()`: keep JAX's compiled programs on disk, as the commands do.

The names load on first use (PEP 562 `__getattr__`), so `import jaxsparse` and the CLI's
`--help` do not import JAX.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

# public name -> the module that defines it
_EXPORTS = {
    "Evaluator": "jaxsparse.evaluate",
    "Generator": "jaxsparse.generate",
    "SamplingParams": "jaxsparse.generate",
    "calibrate": "jaxsparse.calibrate",
    "enable_compilation_cache": "jaxsparse.compilation_cache",
    "load_model": "jaxsparse.loading",
    "load_state": "jaxsparse.sparsity",
}
__all__ = [
    "Evaluator",
    "Generator",
    "SamplingParams",
    "calibrate",
    "enable_compilation_cache",
    "load_model",
    "load_state",
]

if TYPE_CHECKING:
    from jaxsparse.calibrate import calibrate
    from jaxsparse.compilation_cache import enable_compilation_cache
    from jaxsparse.evaluate import Evaluator
    from jaxsparse.generate import Generator, SamplingParams
    from jaxsparse.loading import load_model
    from jaxsparse.sparsity import load_state


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        setattr(sys.modules[__name__], name, value)
        return value
    raise AttributeError(f"module 'jaxsparse' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """The import system binds each submodule it loads as an attribute of its package;
    `calibrate` is both a submodule and a public function, and the public name means the
    function (as an eager `from jaxsparse.calibrate import calibrate` here would)."""

    def __setattr__(self, name: str, value) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
