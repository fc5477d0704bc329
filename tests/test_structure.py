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
from qcompare.sdk.registry import get_registry
from qcompare.engine.recipe import load_recipe
from qcompare.engine.cells import expand
registry = get_registry()
assert {{"torchao", "gptq", "awq"}} <= set(registry.names("quantizer")), registry.names("quantizer")
assert {{"none", "sft", "gkd"}} <= set(registry.names("distiller"))
for name in registry.names("quantizer") + registry.names("distiller"):
    kind = "quantizer" if name in registry.names("quantizer") else "distiller"
    registry.get(kind, name).Params.model_json_schema()
recipe = load_recipe("{ROOT / 'recipes' / 'toy_int4.toml'}")
assert len(expand(recipe)) == 22
# plan's price: parameter counts from safetensors headers, tokens from the distillers' parameters
from qcompare.engine.estimate import estimate_cells
from qcompare.results.store import RunStore
priced = estimate_cells(recipe, RunStore("/nonexistent/run"), expand(recipe), registry, "cpu")
assert all(e.flops is not None for e in priced.values()), priced
print(sorted(m for m in {HEAVY!r} if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"heavy modules imported: {out.stdout}"


def _imports(path: Path, package: str = "", modules: frozenset = frozenset()) -> set[str]:
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
                # ``from package import module`` imports the module (the package's __init__ only runs)
                submodules = {f"{base}.{a.name}" for a in node.names} & modules
                found |= submodules or {base}
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


# The core's parts, bottom up: a part imports only from the parts below it (errors, compat and
# testing sit beside them: errors below all, the other two public modules over the SDK).
LAYERS = ["qcompare.results", "qcompare.sdk", "qcompare.engine", "qcompare.reports", "qcompare.export",
          "qcompare.study", "qcompare.cli"]


def _part(module: str) -> str | None:
    return next((p for p in LAYERS if module == p or module.startswith(p + ".")), None)


def _graph(top: str, importable: str | None = None) -> dict[str, list[str]]:
    """Module -> the modules of the same package it imports (``top`` is the folder, ``importable``
    the name it is imported by when that differs)."""
    modules = _modules(top)
    rename = (lambda m: importable + m[len(top):]) if importable else (lambda m: m)
    named = {rename(m): (path, rename(package)) for m, (path, package) in modules.items()}
    known = frozenset(named)
    return {m: sorted(i for i in _imports(path, package, known) if i in named and i != m)
            for m, (path, package) in named.items()}


def test_the_core_has_no_import_cycles_and_each_part_imports_only_the_parts_below_it():
    graph = _graph("qcompare")
    _check_acyclic(graph)
    upward = [f"{m} imports {d}" for m, deps in graph.items() for d in deps
              if _part(m) and _part(d) and LAYERS.index(_part(d)) > LAYERS.index(_part(m))]
    assert not upward, upward
    # the public modules beside the parts: errors below everything, compat needs nothing of qcompare but
    # its scope (which model types its patches serve), and the scope nothing at all
    assert graph["qcompare.errors"] == [] and graph["qcompare.compat_scope"] == []
    assert graph["qcompare.compat"] == ["qcompare.compat_scope"]


def test_the_built_in_plugins_have_no_import_cycles_lazy_imports_included():
    # a plugin's light module (what the entry point names) imports its torch module inside methods;
    # the torch module never imports the light one back
    _check_acyclic(_graph("plugins", "qcompare_plugins"))


def _plugin_files():
    return sorted([*(ROOT / "plugins").rglob("*.py"), *(ROOT / "examples").rglob("*.py")])


def test_plugins_import_qcompare_only_through_the_sdk():
    """Built-in and example plugins (and their tests) use ``qcompare.sdk`` alone, so the rest of the core
    can move without breaking anyone's plugin."""
    outside = []
    for path in _plugin_files():
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            outside += [f"{path.relative_to(ROOT)}:{node.lineno} imports {n}" for n in names
                        if (n == "qcompare" or n.startswith("qcompare.")) and n != "qcompare.sdk"]
    assert not outside, outside


def test_no_plugin_module_imports_another_ones_private_names():
    # one convention for the light/heavy split: the heavy module implements, the light one describes,
    # and neither reaches into the other's (or a third module's) private names
    ours = ("qcompare_plugins", "qcompare_rtn", "qcompare_nf3")
    private = []
    for path in _plugin_files():
        if "tests" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith(ours)):
                private += [f"{path.relative_to(ROOT)}:{node.lineno} imports {a.name} from {node.module}"
                            for a in node.names if a.name.startswith("_")]
    assert not private, private
