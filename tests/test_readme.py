"""Every ```bash and ```python block of README.md runs as written.

The blocks run in document order, all in one temporary directory (so a later block may use
what an earlier one wrote, as a reader following the README would), with this venv's bin
first on PATH (as after `source .venv/bin/activate`): bash blocks with `bash -e -o
pipefail`, python blocks as a script. Fences of other languages (```text, plain ```) are
not run. A failing block fails its own test, with its output.

Markers: HTML comments on the lines right before a block's opening fence (a renderer hides
them). One directive each:

    <!-- readme-test: skip REASON -->
        not run; REASON says what runs it instead (e.g. a GPU benchmark: "needs a GPU").
    <!-- readme-test: replace OLD => NEW -->
        run with the text OLD replaced by NEW, to run a long command at a reduced size
        (fewer tokens, fewer steps). OLD must occur in the block. Several may precede a
        block; they apply in order.

Anything else after `readme-test:` is an error (`test_readme_markers`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
RUN_LANGUAGES = ("bash", "python")
MARKER = re.compile(r"^<!--\s*readme-test:\s*(.*?)\s*-->\s*$")
BLOCK_TIMEOUT_S = 1800  # a safety net: a block takes seconds to minutes on a free CPU


@dataclasses.dataclass
class Block:
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    markers: list[str]

    @property
    def id(self) -> str:
        return f"L{self.line}-{self.language}"

    def skip_reason(self) -> str | None:
        for m in self.markers:
            if m.split(None, 1)[0] == "skip":
                return m[len("skip") :].strip()
        return None

    def code_to_run(self) -> str:
        code = self.code
        for m in self.markers:
            if m.split(None, 1)[0] == "replace":
                old, new = (x.strip() for x in m[len("replace") :].split("=>", 1))
                code = code.replace(old, new)
        return code


def readme_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a Markdown text, with the markers right above each."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start, language = i, m.group(1)
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"README.md:{start + 1}: code block never closed"
        markers, k = [], start - 1
        while k >= 0 and (MARKER.match(lines[k]) or not lines[k].strip()):
            if lines[k].strip():
                markers.insert(0, MARKER.match(lines[k]).group(1))
            k -= 1
        blocks.append(Block(start + 1, language, "\n".join(lines[start + 1 : end]) + "\n", markers))
        i = end + 1
    return blocks


# The files and directories a command says it writes: `--json FILE`, `--out DIR`,
# `--report FILE`, `--write-text FILE`, `--write-tasks FILE` (a value on the same line).
WRITES = re.compile(r"--(?:json|out|report|write-text|write-tasks)[ \t]+([^\s\\-]\S*)")


def written_paths(code: str) -> list[str]:
    """The paths a block's commands write (`WRITES`), in order."""
    return WRITES.findall(code)


BLOCKS = readme_blocks(README.read_text())
RUN_BLOCKS = [b for b in BLOCKS if b.language in RUN_LANGUAGES]


def test_readme_markers():
    """Every marker is a known directive, a skip names its reason, and every replace
    finds its text (so a marker cannot silently stop applying)."""
    assert RUN_BLOCKS, "README.md has no bash/python blocks"
    for b in BLOCKS:
        for m in b.markers:
            directive = m.split(None, 1)[0] if m else ""
            assert directive in ("skip", "replace"), f"README.md:{b.line}: unknown marker {m!r}"
            if directive == "skip":
                assert b.skip_reason(), f"README.md:{b.line}: skip without a reason"
            else:
                assert "=>" in m, f"README.md:{b.line}: replace needs 'OLD => NEW': {m!r}"
                old = m[len("replace") :].split("=>", 1)[0].strip()
                assert old and old in b.code, f"README.md:{b.line}: {old!r} is not in the block"
        if b.markers:
            assert b.language in RUN_LANGUAGES, f"README.md:{b.line}: marker on a block not run"


def test_marker_parsing():
    text = (
        "x\n<!-- readme-test: replace A => B -->\n\n<!-- readme-test: replace B => C -->\n"
        "```bash\necho A\n```\n```python\nprint(1)\n```\n```\nplain\n```\n"
    )
    a, b, c = readme_blocks(text)
    assert (a.line, a.language, a.markers) == (5, "bash", ["replace A => B", "replace B => C"])
    assert a.code_to_run() == "echo C\n" and a.skip_reason() is None
    assert (b.language, b.code, b.markers) == ("python", "print(1)\n", [])
    assert c.language == ""


def test_written_paths():
    code = (
        "jaxsparse eval --max-tokens 8 \\\n    --json results/a.json  # x\n"
        "jaxsparse generate --prompt hi --json\njaxsparse calibrate --out states/s \\\n"
        "    --no-progress\njaxsparse sweep --out sweep/ --report r.json\n"
    )
    assert written_paths(code) == ["results/a.json", "states/s", "sweep/", "r.json"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, smollm2) -> Path:  # smollm2: the default model is cached
    return tmp_path_factory.mktemp("readme")


@pytest.mark.slow
@pytest.mark.parametrize("block", RUN_BLOCKS, ids=lambda b: b.id)
def test_readme_block(block: Block, workdir: Path):
    reason = block.skip_reason()
    if reason is not None:
        pytest.skip(f"README.md:{block.line}: {reason}")
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("JAX_PLATFORMS", "cpu")
    code = block.code_to_run()
    cmd = (
        ["bash", "-e", "-o", "pipefail", "-c", code]
        if block.language == "bash"
        else [sys.executable, "-c", code]
    )
    t0 = time.time()
    out = subprocess.run(
        cmd,
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=BLOCK_TIMEOUT_S,
    )
    print(f"README.md:{block.line} ({block.language}) ran in {time.time() - t0:.0f} s")
    assert out.returncode == 0, (
        f"README.md:{block.line} ({block.language}) exited {out.returncode}\n--- ran:\n{code}"
        f"--- stdout:\n{out.stdout[-3000:]}\n--- stderr:\n{out.stderr[-5000:]}"
    )
    # what the commands say they write is there: non-empty files (JSON that parses), and
    # directories that hold something
    for rel in written_paths(code):
        path = workdir / rel
        assert path.exists(), f"README.md:{block.line}: {rel} was not written"
        if path.is_dir():
            assert any(path.iterdir()), f"README.md:{block.line}: {rel} is empty"
        else:
            assert path.stat().st_size > 0, f"README.md:{block.line}: {rel} is empty"
            if path.suffix == ".json":
                json.loads(path.read_text())
