"""Text for calibration and evaluation: user files, the built-in corpus, token packing, tasks.

- User data (`--data`, `--ppl`): plain text files (one document each) and JSONL files
  (one document per line, in a `text` field).
- The built-in corpus: the docstrings of the Python standard library, read by parsing the
  source files with `ast` (nothing is imported, so nothing runs), in a fixed order; the
  result is remembered under the cache directory, keyed by every source file's size and
  mtime and the Python version. Each module gives one document (its docstring and those
  of its classes and functions, in source order). Top-level packages are split by a hash
  of their name into two disjoint named splits, `calibration` (~80%) and `evaluation`
  (~20%), so evaluation text is never calibration text. It depends on the Python version
  (recorded in the provenance).
- `pack_tokens`: documents tokenized without special tokens, each followed by EOS,
  concatenated and cut into sequences of `seq_len` tokens.
- Multiple-choice tasks: JSONL, one `{"context": str, "choices": [str, ...], "gold": int}` a
  line (`read_tasks` validates it), and a built-in cloze task set built deterministically
  from the evaluation split (`builtin_tasks`).

It holds no model code; `jaxsparse data` (`jaxsparse.cli.data`) exports the built-in text and
tasks.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import json
import os
import random
import re
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jaxsparse.io import cache_dir, write_text_atomic

SPLITS = ("calibration", "evaluation")
EVALUATION_PERCENT = 20
BUILTIN_NAME = "stdlib-docstrings"
# Directories of the standard library that hold tests, bundled wheels or third-party code.
_SKIP_DIRS = {
    "site-packages",
    "dist-packages",
    "test",
    "tests",
    "idle_test",
    "__pycache__",
    "_bundled",
    "turtledemo",
    "__phello__",
}
_MIN_DOCSTRING_CHARS = 40


class DataError(ValueError):
    """Unusable input data: an empty or too-short file, a malformed JSONL line."""


# ------------------------------------------------------------------ built-in corpus


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _split_of(module: str) -> str:
    top = module.split(".")[0]
    h = int.from_bytes(hashlib.sha256(top.encode()).digest()[:4], "big")
    return "evaluation" if h % 100 < EVALUATION_PERCENT else "calibration"


def _module_files(root: Path) -> list[tuple[str, Path]]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        rel = Path(dirpath).relative_to(root)
        if rel.parts and not (Path(dirpath) / "__init__.py").is_file():
            continue  # not a package (e.g. config-3.11-x86_64-linux-gnu, lib-dynload)
        for f in sorted(filenames):
            if not f.endswith(".py") or f.startswith("test_") or f == "__main__.py":
                continue
            parts = list(rel.parts) + ([] if f == "__init__.py" else [f[:-3]])
            if not parts:
                continue
            out.append((".".join(parts), Path(dirpath) / f))
    return sorted(out)


def _docstrings(tree: ast.AST) -> Iterator[str]:
    """Docstrings of a module, its classes and functions, in source order."""
    doc = (
        ast.get_docstring(tree, clean=True)
        if isinstance(tree, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        else None
    )
    if doc:
        yield doc
    for node in getattr(tree, "body", []):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _docstrings(node)


@dataclasses.dataclass(frozen=True)
class Document:
    source: str  # a file path, "file.jsonl:LINE", or "stdlib:module"
    text: str


def stdlib_documents(split: str) -> list[Document]:
    """The built-in corpus split (`calibration` or `evaluation`), one document per module."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return list(_stdlib_documents(split))


@functools.cache
def _stdlib_documents(split: str) -> tuple[Document, ...]:
    """The split's documents, parsed once per standard library and remembered on disk
    (`_corpus_cache_path`): parsing ~700 modules takes seconds, every command needs them."""
    files = [(m, p) for m, p in _module_files(stdlib_root()) if _split_of(m) == split]
    cache = _corpus_cache_path(split, files)
    docs = _read_corpus_cache(cache)
    if docs is None:
        docs = _parse_documents(files)
        try:  # a cache that cannot be written only costs the parse next time
            write_text_atomic(cache, json.dumps([[d.source, d.text] for d in docs]))
        except OSError:
            pass
    return docs


def _parse_documents(files: list[tuple[str, Path]]) -> tuple[Document, ...]:
    docs = []
    for module, path in files:
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
            continue
        parts = [d for d in _docstrings(tree) if len(d) >= _MIN_DOCSTRING_CHARS]
        if parts:
            docs.append(Document(f"stdlib:{module}", "\n\n".join(parts)))
    return tuple(docs)


# Bump when what `_parse_documents` extracts changes: old cache entries are then ignored.
_CORPUS_CACHE_FORMAT = 1


def _corpus_cache_path(split: str, files: list[tuple[str, Path]]) -> Path:
    """`<cache>/corpus/stdlib-docstrings-<split>-<key>.json`, the key a hash of the Python
    version, the extraction's format and settings, and every source file's name, size and
    mtime: an edited, added or removed module, or another Python, gives another entry."""
    h = hashlib.sha256()
    h.update(f"{_CORPUS_CACHE_FORMAT}\n{sys.version}\n{_MIN_DOCSTRING_CHARS}\n".encode())
    for module, path in files:
        try:
            st = path.stat()
            h.update(f"{module}\t{path}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{module}\t{path}\t-\n".encode())
    return cache_dir() / "corpus" / f"{BUILTIN_NAME}-{split}-{h.hexdigest()[:20]}.json"


def _read_corpus_cache(path: Path) -> tuple[Document, ...] | None:
    """The cached documents, or None when there is no usable entry (missing, unreadable or
    malformed: the caller parses again and rewrites it)."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(rows, list) or not all(
        isinstance(r, list) and len(r) == 2 and all(isinstance(x, str) for x in r) for r in rows
    ):
        return None
    return tuple(Document(source, text) for source, text in rows)


def builtin_provenance(split: str) -> dict[str, Any]:
    return {
        "name": BUILTIN_NAME,
        "split": split,
        "python": sys.version.split()[0],
        "root": str(stdlib_root()),
    }


# ------------------------------------------------------------------ user files


def read_documents(paths: Iterable[str | Path]) -> list[Document]:
    """Documents from plain text files (one each) and JSONL files (a `text` field a line)."""
    docs = []
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        try:
            content = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e})") from None
        if path.suffix == ".jsonl":
            found = []
            for n, line in enumerate(content.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise DataError(f'{path}:{n}: expected an object with a string "text" field')
                if obj["text"].strip():
                    found.append(Document(f"{path}:{n}", obj["text"]))
            if not found:
                raise DataError(f'{path}: contains no text (no line with a non-empty "text")')
            docs.extend(found)
        else:
            if not content.strip():
                raise DataError(f"{path}: contains no text (the file is empty)")
            docs.append(Document(str(path), content))
    return docs


def eos_token_id(config, tokenizer) -> int:
    if config is not None and config.eos_token_ids:
        return int(config.eos_token_ids[0])
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError("the tokenizer has no EOS token and the config names none")
    return int(eos)


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def token_stream(docs: Iterable[Document], tokenizer, eos: int) -> Iterator[int]:
    for doc in docs:
        yield from encode(tokenizer, doc.text)
        yield eos


def pack_tokens(
    docs: list[Document], tokenizer, eos: int, seq_len: int, num_tokens: int | None, what: str
) -> np.ndarray:
    """[N, seq_len] int32: the documents' tokens (each + EOS) cut into full sequences.

    With `num_tokens`, N = ceil(num_tokens / seq_len) and fewer tokens is an error naming
    `what` (the files) and the counts; without, every full sequence is kept.
    """
    if seq_len < 2:
        raise DataError(f"--seq-len {seq_len}: need at least 2 tokens per sequence")
    need = None if num_tokens is None else -(-num_tokens // seq_len) * seq_len
    buf: list[int] = []
    for doc in docs:
        buf.extend(encode(tokenizer, doc.text))
        buf.append(eos)
        if need is not None and len(buf) >= need:
            break
    if need is not None and len(buf) < need:
        raise DataError(
            f"{what}: found {len(buf)} tokens, need {need} ({num_tokens} tokens requested, "
            f"{need // seq_len} sequences of {seq_len}); give more text or lower --tokens"
        )
    n = len(buf) // seq_len if need is None else need // seq_len
    if n == 0:
        raise DataError(
            f"{what}: found {len(buf)} tokens, need at least {seq_len} "
            f"(one sequence of --seq-len {seq_len})"
        )
    return np.asarray(buf[: n * seq_len], np.int32).reshape(n, seq_len)


def token_rows(
    paths: list[str] | None,
    split: str,
    config,
    tokenizer,
    seq_len: int,
    num_tokens: int | None,
) -> tuple[str, np.ndarray]:
    """`(what, rows)`: the text of `paths` (default: the built-in corpus's `split`), its
    description, and its tokens packed into `[N, seq_len]` rows (`pack_tokens`), EOS
    from `config` or `tokenizer`."""
    what = describe_sources(paths, split)
    docs = load_documents(paths, split)
    eos = eos_token_id(config, tokenizer)
    return what, pack_tokens(docs, tokenizer, eos, seq_len, num_tokens, what)


def describe_sources(paths: list[str] | None, split: str) -> str:
    if paths:
        return ", ".join(str(p) for p in paths)
    return f"built-in corpus ({BUILTIN_NAME}, {split} split)"


def load_documents(paths: list[str] | None, split: str) -> list[Document]:
    """User files if given, else the built-in corpus split."""
    return read_documents(paths) if paths else stdlib_documents(split)


# ------------------------------------------------------------------ multiple-choice tasks


@dataclasses.dataclass(frozen=True)
class Task:
    context: str
    choices: tuple[str, ...]
    gold: int

    def to_json(self) -> str:
        return json.dumps(
            {"context": self.context, "choices": list(self.choices), "gold": self.gold},
            ensure_ascii=False,
        )


def read_tasks(path: str | Path) -> list[Task]:
    """Validated tasks from a JSONL file; errors name the line and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    tasks = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        missing = [k for k in ("context", "choices", "gold") if k not in obj]
        if missing:
            raise DataError(f"{where}: missing field(s) {', '.join(missing)}")
        ctx, choices, gold = obj["context"], obj["choices"], obj["gold"]
        if not isinstance(ctx, str):
            raise DataError(f'{where}: "context" must be a string')
        if (
            not isinstance(choices, list)
            or len(choices) < 2
            or not all(isinstance(c, str) and c for c in choices)
        ):
            raise DataError(f'{where}: "choices" must be a list of at least 2 non-empty strings')
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise DataError(
                f'{where}: "gold" must be an integer index into choices '
                f"(0..{len(choices) - 1}), got {gold!r}"
            )
        tasks.append(Task(ctx, tuple(choices), gold))
    if not tasks:
        raise DataError(f"{path}: contains no tasks")
    return tasks


_PROSE = re.compile(r"^[A-Za-z][\w ,.;:'()\-]*$")


def _paragraphs(docs: list[Document]) -> list[list[str]]:
    out = []
    for doc in docs:
        for para in doc.text.split("\n\n"):
            if ">>>" in para or "::" in para:
                continue
            text = " ".join(para.split())
            words = text.split()
            if len(words) >= 14 and _PROSE.match(text):
                out.append(words)
    return out


def builtin_tasks(
    num_tasks: int = 200,
    num_choices: int = 4,
    seed: int = 0,
    context_words: int = 24,
    continuation_words: int = 6,
) -> list[Task]:
    """A cloze task set from the evaluation split: which continuation follows the context?

    Context: the first words of a prose paragraph (at most `context_words`); the true
    continuation is its next `continuation_words` words; the distractors are the same span
    of other paragraphs. Deterministic for a given Python version.
    """
    paras = _paragraphs(stdlib_documents("evaluation"))
    rng = random.Random(seed)
    rng.shuffle(paras)
    spans = []
    for words in paras:
        k = min(context_words, len(words) - continuation_words)
        spans.append((" ".join(words[:k]), " " + " ".join(words[k : k + continuation_words])))
    tasks: list[Task] = []
    used = set()
    for i, (ctx, cont) in enumerate(spans):
        if len(tasks) >= num_tasks:
            break
        if ctx in used:
            continue
        others = [c for j, (_, c) in enumerate(spans) if j != i and c != cont]
        if len(others) < num_choices - 1:
            break
        distractors = rng.sample(others, num_choices - 1)
        if len(set(distractors)) < num_choices - 1:
            continue
        gold = rng.randrange(num_choices)
        choices = distractors[:gold] + [cont] + distractors[gold:]
        tasks.append(Task(ctx, tuple(choices), gold))
        used.add(ctx)
    return tasks


def write_tasks(tasks: list[Task], path: str | Path) -> None:
    """Writes `tasks` as JSONL (atomically; parent folders are created)."""
    from jaxsparse.io import write_text_atomic

    write_text_atomic(path, "".join(t.to_json() + "\n" for t in tasks))
