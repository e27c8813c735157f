"""JAX's persistent compilation cache, where jaxsparse keeps it.

Compiling a 30-layer model's prefill and decode loop takes seconds to tens of seconds on
a small CPU; with the cache on, a later process with the same model, shapes and method
reads the compiled programs back instead. `jaxsparse` commands turn it on themselves;
`enable_compilation_cache()` (also `jaxsparse.enable_compilation_cache`) does it for a
script or notebook. It changes process-wide JAX configuration, so jaxsparse never calls it
on import.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

XLA_CACHE_ENV = "JAXSPARSE_XLA_CACHE"


def enable_compilation_cache() -> Path | None:
    """Turns on JAX's persistent compilation cache, so that a process run again (the same
    model, shapes and method) loads its compiled programs from disk instead of compiling
    them. Every `jaxsparse` command but `convert` calls it; in a notebook or script, call
    it once before the first compiled call.

    The directory: `$JAXSPARSE_XLA_CACHE` if set (`off` turns it off), else the cache JAX
    was given (`JAX_COMPILATION_CACHE_DIR`), else `xla/` in jaxsparse's cache directory
    (`jaxsparse.io.cache_dir()`). Returns the directory in use, or None."""
    import jax

    from jaxsparse.io import cache_dir

    chosen = os.environ.get(XLA_CACHE_ENV, "").strip()
    if chosen.lower() in ("off", "0", "false", "no"):
        return None
    if not chosen and jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    path = Path(chosen) if chosen else cache_dir() / "xla"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a cache that cannot be made is not worth stopping for
        print(
            f"warning: {XLA_CACHE_ENV}: cannot create {path} ({e}); compiling without a "
            f"persistent cache (set {XLA_CACHE_ENV}=off to silence this)",
            file=sys.stderr,
        )
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    return path
