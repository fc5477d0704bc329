"""The package builds quietly and ships the toy world: a wheel built from this checkout holds every
file of the toy model, its data and its lm-eval tasks, and the build prints no packaging warning."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ("plugins/toy/model", "plugins/toy/model-moe", "plugins/toy/model-narrow",
           "plugins/toy/data", "plugins/toy/tasks")


def test_the_wheel_ships_the_toy_world_and_the_build_prints_no_warning(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                            str(tmp_path), str(ROOT)], capture_output=True, text=True, cwd=tmp_path)
    assert build.returncode == 0, build.stderr
    said = build.stdout + build.stderr
    assert "Warning" not in said and "would be ignored" not in said, said
    [wheel] = tmp_path.glob("qcompare-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    tracked = subprocess.run(["git", "ls-files", *SHIPPED], capture_output=True, text=True, cwd=ROOT).stdout.split()
    # the built-in plugins live in plugins/ and install as qcompare_plugins
    data = ["qcompare_plugins/" + f.removeprefix("plugins/") for f in tracked if not f.endswith(".py")]
    assert any(f.endswith(".yaml") for f in data) and any("tasks/data/" in f for f in data)
    assert sorted(set(data) - names) == []  # every task YAML, task data file, model file and chat file
    entry_points = next(zipfile.ZipFile(wheel).read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert "qcompare/sdk/__init__.py" in names and "qcompare/engine/pipeline.py" in names
    for module in ("qcompare_plugins.float_formats", "qcompare_plugins.torchao_quantizer", "qcompare_plugins.toy"):
        assert module in entry_points and f"{module.replace('.', '/')}" in " ".join(names)
