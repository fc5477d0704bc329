"""The shape of the code that everything else leans on: a registry that loads without the
training stacks, and a core whose modules import each other in one direction only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "trl", "peft", "torchao", "lm_eval", "datasets", "llmcompressor", "accelerate")


def test_listing_plugins_validating_and_pricing_a_recipe_import_no_training_stack():
    code = f"""
import sys
from qcompare.plugins import get_registry
from qcompare.recipe import load_recipe
from qcompare.cells import expand
registry = get_registry()
assert {{"torchao", "gptq", "awq"}} <= set(registry.names("quantizer")), registry.names("quantizer")
assert {{"none", "sft", "gkd"}} <= set(registry.names("distiller"))
for name in registry.names("quantizer") + registry.names("distiller"):
    kind = "quantizer" if name in registry.names("quantizer") else "distiller"
    registry.get(kind, name).Params.model_json_schema()
recipe = load_recipe("{ROOT / 'recipes' / 'toy_int4.toml'}")
assert len(expand(recipe)) == 22
# plan's price: parameter counts from safetensors headers, tokens from the distillers' parameters
from qcompare.estimate import estimate_cells
from qcompare.store import RunStore
priced = estimate_cells(recipe, RunStore("/nonexistent/run"), expand(recipe), registry, "cpu")
assert all(e.flops is not None for e in priced.values()), priced
print(sorted(m for m in {HEAVY!r} if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"heavy modules imported: {out.stdout}"


def _imports(path: Path, package: str = "") -> set[str]:
    """Every qcompare module ``path`` imports, at the top or inside a function (relative imports
    resolved against ``package``, the package ``path`` belongs to)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            if base.startswith("qcompare"):
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("qcompare"))
    return found


def _modules(top: str) -> dict[str, tuple[Path, str]]:
    """Every module of package ``top``: dotted name -> (file, the package it belongs to)."""
    out = {}
    for path in sorted((ROOT / top).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__main__":
            continue
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        out[name] = (path, name if is_package else ".".join(parts[:-1]))
    return out


def _check_acyclic(graph: dict[str, list[str]]) -> None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for n in graph[m]:
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m)


def test_the_core_has_no_import_cycles():
    modules = {f"qcompare.{p.stem}": p for p in (ROOT / "qcompare").glob("*.py") if p.stem not in ("__init__", "__main__")}
    graph = {m: sorted(i for i in _imports(p) if i in modules and i != m) for m, p in modules.items()}
    _check_acyclic(graph)
    # the command line sits on top: nothing in the core imports it
    assert not [m for m, deps in graph.items() if "qcompare.cli" in deps]


def test_the_built_in_plugins_have_no_import_cycles_lazy_imports_included():
    # a plugin's light module (what the entry point names) imports its torch module inside methods;
    # the torch module never imports the light one back
    modules = _modules("qcompare_plugins")
    graph = {m: sorted(i for i in _imports(path, package) if i in modules and i != m)
             for m, (path, package) in modules.items()}
    _check_acyclic(graph)
