"""The design doc the code cites is in the repository: every `docs/design.md` reference
in the code, tests, benchmarks and docs names a section that docs/design.md has, and no
file cites a design file outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("jaxsparse", "pallas_kernels", "convert", "benchmarks", "tests", "docs", "notebooks")
# `docs/design.md, "Section"` or `docs/design.md ("Section")`
REFERENCE = re.compile(r"docs/design\.md\W{0,3}\"([^\"]+)\"")


def files():
    yield ROOT / "README.md"
    for d in SOURCES:
        for p in sorted((ROOT / d).rglob("*")):
            if p.suffix in (".py", ".md", ".ipynb") and p.is_file() and p != Path(__file__):
                yield p


def headings() -> set[str]:
    text = (ROOT / "docs" / "design.md").read_text()
    return {m.group(1).strip() for m in re.finditer(r"^#+ (.+)$", text, re.MULTILINE)}


def test_design_references_name_existing_sections():
    have = headings()
    found, bad = 0, []
    for p in files():
        for m in REFERENCE.finditer(p.read_text()):
            found += 1
            if m.group(1) not in have:
                bad.append(f"{p.relative_to(ROOT)}: {m.group(0)}")
    assert found >= 4  # the check sees the references (llama.py, predictors.py, benchmarks)
    assert not bad, f"sections missing from docs/design.md ({sorted(have)}):\n" + "\n".join(bad)


def test_no_design_file_outside_the_repo_is_cited():
    bad = [
        str(p.relative_to(ROOT))
        for p in files()
        if "DESIGN.md" in p.read_text() or "../shared" in p.read_text()
    ]
    assert not bad, f"cite docs/design.md instead: {bad}"
