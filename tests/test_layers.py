"""The layers of docs/design.md ("Layers") hold: no module of jaxsparse/, pallas_kernels/ or
convert/ imports (at module level or inside a function) from a layer above its own.

The import graph is read from the source with `ast`, nothing is imported. Every module must
be placed in a layer below, so that a new module is placed deliberately.
"""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("jaxsparse", "pallas_kernels", "convert")

# Lowest first. A module may import from its own layer and from the layers below it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    # configs, files, caches, the built-in text, device meshes
    (
        "base",
        (
            "jaxsparse.config",
            "jaxsparse.io",
            "jaxsparse.compilation_cache",
            "jaxsparse.data",
            "jaxsparse.sharding",
        ),
    ),
    # kernels: pure functions on arrays, no model code
    ("kernels", ("pallas_kernels", "pallas_kernels.*")),
    # what a method does at inference: the state pytree and the masks it gives
    ("rules", ("jaxsparse.rules", "jaxsparse.sparsity")),
    # Flax modules, weight layouts, and the scored forward pass built on them
    ("models", ("jaxsparse.models", "jaxsparse.models.*", "jaxsparse.measure")),
    # checkpoint formats -> params (they need the model's param shapes)
    (
        "formats",
        (
            "jaxsparse.checkpoint",
            "convert",
            "convert.converter",
            "convert.readers",
            "convert.keymaps",
            "convert.gguf_tokenizer",
        ),
    ),
    # how a method is fitted: statistics, calibration, learning, predictors, budgets
    (
        "fitting",
        (
            "jaxsparse.methods",
            "jaxsparse.methods.*",
            "jaxsparse.calibrate",
            "jaxsparse.training",
            "jaxsparse.learn",
            "jaxsparse.learn_kl",
            "jaxsparse.predictors",
            "jaxsparse.budget",
        ),
    ),
    # running a model with a state: generation, evaluation, sweeps, model loading
    (
        "inference",
        (
            "jaxsparse.generate",
            "jaxsparse.evaluate",
            "jaxsparse.sweep",
            "jaxsparse.sweep_budget",
            "jaxsparse.loading",
            "jaxsparse.registry",
        ),
    ),
    # the public API (jaxsparse/__init__.py): names from the layers above, loaded lazily
    ("api", ("jaxsparse",)),
    # argument parsing and printing only
    ("cli", ("jaxsparse.cli", "jaxsparse.cli.*", "convert.__main__")),
]


def layer_of(module: str) -> int:
    for rank, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return rank
    raise KeyError(module)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(name: str) -> bool:
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports_of(path: Path) -> set[str]:
    """The project modules `path` imports; `from pkg import name` counts as `pkg.name` when
    that is a module, else as `pkg`."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            targets = [
                f"{mod}.{a.name}" if is_module(f"{mod}.{a.name}") else mod for a in node.names
            ]
        else:
            continue
        for t in targets:
            if t.split(".")[0] not in PACKAGES:
                continue
            while not is_module(t) and "." in t:  # `import a.b.attr` styles: the module
                t = t.rsplit(".", 1)[0]
            if t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    return {
        module_name(p): imports_of(p)
        for pkg in PACKAGES
        for p in sorted((ROOT / pkg).rglob("*.py"))
    }


def upward_edges(g: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, deps in g.items():
        for dep in sorted(deps):
            if layer_of(dep) > layer_of(mod):
                bad.append(
                    f"{mod} ({LAYERS[layer_of(mod)][0]}) imports {dep} ({LAYERS[layer_of(dep)][0]})"
                )
    return bad


def test_every_module_has_a_layer():
    missing = [m for m in graph() if not _placed(m)]
    assert not missing, f"place these modules in a layer of tests/test_layers.py: {missing}"


def _placed(module: str) -> bool:
    try:
        layer_of(module)
    except KeyError:
        return False
    return True


def test_no_module_imports_from_a_layer_above():
    bad = upward_edges(graph())
    assert not bad, "imports that go up a layer (docs/design.md, Layers):\n" + "\n".join(bad)


def test_the_check_sees_lazy_imports_and_flags_an_upward_edge():
    """An import inside a function counts, and an edge that goes up is reported."""
    g = graph()
    assert "jaxsparse.rules" in g["jaxsparse.models.layers"]  # inside Kernels.__post_init__
    assert "jaxsparse.measure" in g["jaxsparse.budget"]  # inside FractionMeter.__init__
    g["jaxsparse.rules"] = g["jaxsparse.rules"] | {"jaxsparse.evaluate"}
    assert upward_edges(g) == ["jaxsparse.rules (rules) imports jaxsparse.evaluate (inference)"]


@pytest.mark.parametrize(
    "module,layer",
    [
        ("jaxsparse.cli.eval", "cli"),
        ("pallas_kernels.gated_matvec", "kernels"),
        ("jaxsparse.methods.chess", "fitting"),
    ],
)
def test_layer_patterns(module, layer):
    assert LAYERS[layer_of(module)][0] == layer


def test_only_the_cli_parses_arguments():
    """Argument parsing lives in jaxsparse/cli/ (and `python -m convert`): no library module
    imports argparse."""
    cli = {m for m in graph() if LAYERS[layer_of(m)][0] == "cli"}
    bad = []
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            if module_name(p) in cli:
                continue
            for node in ast.walk(ast.parse(p.read_text(), str(p))):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level:
                    names = [node.module or ""]
                if "argparse" in names:
                    bad.append(module_name(p))
    assert not bad, f"argparse outside jaxsparse/cli/: {bad}"


def test_rules_hold_no_method_names():
    """jaxsparse/rules.py is masking math: no string in it names a method of the registry
    (jaxsparse/registry.py, KERNEL_POINTS), and it defines no predictor network."""
    reg = ast.parse((ROOT / "jaxsparse" / "registry.py").read_text())
    methods = next(
        {k.value for k in node.value.keys}
        for node in ast.walk(reg)
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "KERNEL_POINTS"
    )
    assert {"dense", "chess", "teal", "dejavu"} <= methods
    tree = ast.parse((ROOT / "jaxsparse" / "rules.py").read_text())
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)} - {None}
    assert not strings & methods, f"method names in jaxsparse/rules.py: {strings & methods}"
    defs = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    assert not {d for d in defs if "predict" in d}, "a predictor network in jaxsparse/rules.py"
