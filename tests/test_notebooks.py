"""Every notebook in notebooks/ runs top to bottom on the embedded default model, with the
command README.md gives for it (`jupyter nbconvert --to notebook --execute NOTEBOOK
--output-dir DIR`, run from the repository root with the venv's bin on PATH)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def readme_notebook_command(notebook: Path, output_dir: Path) -> list[str]:
    """README.md's `jupyter nbconvert ...` line, for `notebook`, writing into `output_dir`."""
    line = next(
        (
            ln
            for ln in (ROOT / "README.md").read_text().splitlines()
            if ln.startswith("jupyter nbconvert ")
        ),
        None,
    )
    assert line is not None, "README.md gives no `jupyter nbconvert ...` command"
    args = shlex.split(line, comments=True)
    shown = [a for a in args if a.endswith(".ipynb")]
    assert len(shown) == 1 and "--execute" in args and "--output-dir" in args, line
    args[args.index(shown[0])] = str(notebook)
    args[args.index("--output-dir") + 1] = str(output_dir)
    return args


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, smollm2, tmp_path):  # smollm2: the default model is cached
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("nbconvert")
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("JAX_PLATFORMS", "cpu")
    out = subprocess.run(
        readme_notebook_command(path, tmp_path),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=1200,
    )
    assert out.returncode == 0, out.stderr[-5000:]
    nb = nbformat.read(tmp_path / path.name, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count for c in code), "not every code cell ran"
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    for c in code:  # a plot that does not show (a library switched the backend) is a failure
        if "plt.show()" in c.source:
            assert any("image/png" in o.get("data", {}) for o in c.get("outputs", [])), (
                f"{path.name}: no figure shown by\n{c.source}"
            )


def test_there_are_notebooks():
    assert {p.name for p in NOTEBOOKS} >= {
        "quickstart.ipynb",
        "sparsity_in_a_notebook.ipynb",
        "batch_eval.ipynb",
    }
