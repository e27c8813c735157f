"""Atomic directory writes, shared by every on-disk artifact (model checkpoints, sparsity
states, learned thresholds).

`atomic_directory(path)` hands out a temporary sibling directory; when the `with` block
ends without an exception, it writes a completion marker into it (last) and renames it to
`path`. An interrupted write therefore never leaves a directory at `path`, and an old
directory at `path` is replaced only once the new one is complete. It holds no format
knowledge: what goes inside is the caller's business. `write_text_atomic` does the same
for one file; `natural_order` sorts the keys of the JSON files people read (layers_2
before layers_10).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

COMPLETE_MARKER = "COMPLETE"
CACHE_ENV = "JAXSPARSE_CACHE"


def cache_dir() -> Path:
    """jaxsparse's cache directory: `$JAXSPARSE_CACHE`, else `~/.cache/jaxsparse` (converted
    embedded models, compiled XLA programs, the built-in corpus's parsed docstrings)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "jaxsparse")


class IncompleteDirectoryError(RuntimeError):
    """A directory whose writer did not finish (no completion marker)."""


def is_complete(path: str | Path) -> bool:
    return (Path(path) / COMPLETE_MARKER).is_file()


def require_complete(
    path: str | Path, what: str = "directory", fix: str = "re-run the command that wrote it"
) -> Path:
    """Returns `path` if it exists and carries the completion marker; raises otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such {what}")
    if not is_complete(path):
        raise IncompleteDirectoryError(
            f"{path}: incomplete {what} (no {COMPLETE_MARKER} marker: the write was interrupted "
            f"or it is still running); {fix}"
        )
    return path


def refuse_existing(path: str | Path, overwrite: bool, flag: str = "--overwrite") -> None:
    """Raises FileExistsError if `path` exists and `overwrite` is false."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass {flag} (overwrite=True) to replace it")


@contextlib.contextmanager
def atomic_directory(
    path: str | Path, overwrite: bool = False, flag: str = "--overwrite"
) -> Iterator[Path]:
    """Yields a fresh temporary directory that becomes `path` when the block succeeds.

    On success the completion marker is written last, then the directory is renamed into
    place; an existing `path` is replaced only then (and only with `overwrite`). On an
    exception (KeyboardInterrupt included) the temporary directory is removed and `path`
    is left as it was. `flag` names the option that allows overwriting, for the message.
    """
    path = Path(path).absolute()
    refuse_existing(path, overwrite, flag)
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = path.parent / f".{path.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        marker = {"completed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (tmp / COMPLETE_MARKER).write_text(json.dumps(marker) + "\n")
        refuse_existing(path, overwrite, flag)  # it may have appeared meanwhile
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{tag}"
            path.rename(old)
        tmp.rename(path)
        if old is not None:
            _remove(old)
    except BaseException:
        _remove(tmp)
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Writes `text` (UTF-8) to a temporary sibling of `path`, then renames it to `path`, so
    that a reader never sees a partial file; creates the parent folders."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory; give a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json_atomic(obj: Any, path: str | Path) -> Path:
    """Writes `obj` as indented JSON, keys in natural order (layers_2 before layers_10),
    atomically (`write_text_atomic`). The one JSON writer of the results users keep."""
    return write_text_atomic(path, json.dumps(natural_order(obj), indent=2) + "\n")


def natural_key(key: str) -> tuple:
    """Sort key that orders the digit runs of `key` by value: layers_2 before layers_10."""
    return tuple(
        (0, int(part), "") if part.isdigit() else (1, 0, part)
        for part in re.split(r"(\d+)", str(key))
        if part
    )


def natural_order(obj: Any) -> Any:
    """`obj` with the keys of every dict in it sorted by `natural_key` (for JSON files that
    people read: layers_0, layers_1, ..., layers_10, where `sort_keys` gives layers_0,
    layers_1, layers_10, layers_2)."""
    if isinstance(obj, dict):
        return {k: natural_order(obj[k]) for k in sorted(obj, key=natural_key)}
    if isinstance(obj, list | tuple):
        return [natural_order(v) for v in obj]
    return obj


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink()
