"""Names the docs point a reader to exist in the code they name: a renamed function fails here, not
in a newcomer's search."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
FILE = re.compile(r"`((?:qcompare|qcompare_plugins|bench|scripts)/[A-Za-z0-9_/]+\.py)`")
NAME = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)?)(?:\(\))?`")
DOTTED = re.compile(r"`((?:qcompare|qcompare_plugins)(?:\.[A-Za-z_][A-Za-z0-9_]*)+)(?:\(\))?`")


def _defines(source: str, name: str) -> bool:
    last = name.rpartition(".")[2]
    return re.search(rf"^\s*(?:async\s+)?(?:def|class)\s+{last}\b|^\s*{last}\s*[:=]|\b{last}\s*=\s*property",
                     source, re.M) is not None


# a module of the project by its short name (`estimate.memory` names qcompare/engine/estimate.py's memory)
# (but `cost.loss` and `provenance.processes` are a record's fields, as the docs quote them)
STEMS = {p.stem: p.relative_to(ROOT).as_posix() for top in ("qcompare", "qcompare_plugins")
         for p in (ROOT / top).rglob("*.py") if p.stem not in ("__init__", "__main__", "cost", "provenance")}
# a class of the project by its name (`Runner.run` names qcompare/engine/runner.py's Runner.run)
CLASSES: dict[str, list[str]] = {}
for _p in [p for top in ("qcompare", "qcompare_plugins") for p in (ROOT / top).rglob("*.py")]:
    for _c in re.findall(r"^class\s+([A-Za-z_][A-Za-z0-9_]*)", _p.read_text(), re.M):
        CLASSES.setdefault(_c, []).append(_p.relative_to(ROOT).as_posix())
EXTENSIONS = ("py", "json", "jsonl", "md", "toml", "safetensors", "txt", "log", "png", "html", "sh", "yaml")


def _pointers(path: Path):
    """(line number, files, name) for each code-like name on a line that names a source file, and for
    each `module.name` whose module is one of the project's."""
    for n, line in enumerate(path.read_text().splitlines(), 1):
        files = FILE.findall(line)
        for name in NAME.findall(line):
            module, _, attr = name.rpartition(".")
            if attr in EXTENSIONS:
                continue
            if module in STEMS and module != attr:
                yield n, [STEMS[module]], attr
            elif module in CLASSES:
                yield n, CLASSES[module], attr
            elif files and ("_" in name or re.match(r"[A-Z][a-z]+[A-Z]", name) or "." in name and name[0].isupper()):
                # code names: CamelCase, snake_case, or Class.method; not plain words or settings
                yield n, files, name


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_name_a_doc_points_to_is_in_the_file_it_names(doc):
    missing = []
    for n, files, name in _pointers(doc):
        sources = [(ROOT / f).read_text() for f in files if (ROOT / f).is_file()]
        if len(sources) < len(files):
            missing.append(f"{doc.name}:{n}: {[f for f in files if not (ROOT / f).is_file()]} does not exist")
        elif not any(_defines(s, name) for s in sources):
            missing.append(f"{doc.name}:{n}: `{name}` is not defined in {', '.join(files)}")
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_dotted_name_a_doc_quotes_imports(doc):
    missing = []
    for n, line in enumerate(doc.read_text().splitlines(), 1):
        for dotted in DOTTED.findall(line):
            parts = dotted.split(".")
            for cut in range(len(parts), 0, -1):  # the longest importable module, then attributes
                try:
                    obj = importlib.import_module(".".join(parts[:cut]))
                except ImportError:
                    continue
                try:
                    for attr in parts[cut:]:
                        obj = getattr(obj, attr)
                except AttributeError:
                    missing.append(f"{doc.name}:{n}: `{dotted}` does not resolve")
                break
            else:
                missing.append(f"{doc.name}:{n}: `{dotted}` does not import")
    assert not missing, "\n".join(missing)
