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


def _imports(path: Path) -> set[str]:
    """Every qcompare module ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qcompare"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("qcompare"))
    return found


def test_the_core_has_no_import_cycles():
    modules = {f"qcompare.{p.stem}": p for p in (ROOT / "qcompare").glob("*.py") if p.stem not in ("__init__", "__main__")}
    graph = {m: sorted(i for i in _imports(p) if i in modules and i != m) for m, p in modules.items()}
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
    # the command line sits on top: nothing in the core imports it
    assert not [m for m, deps in graph.items() if "qcompare.cli" in deps]
