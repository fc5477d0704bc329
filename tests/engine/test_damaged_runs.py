"""A run folder that explains itself: damaged, missing or changed files are named, never dropped in
silence; a rerun recomputes what they held and keeps them aside; plan tells running from interrupted."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from conftest import BASIC
from qcompare.cli import app
from qcompare.results.frame import damage_notes, load_run

pytestmark = pytest.mark.e2e  # runs whole cells, runs or commands (not in the fast subset)

cli = CliRunner()


@pytest.fixture
def run(test_plugins, write_recipe, tmp_path, request):
    """BASIC: a teacher, two PTQ cells (keep) and four trained ones (nudge, 2 seeds); models saved, and one
    seed, for a test marked ``save_models``."""
    save = request.node.get_closest_marker("save_models") is not None
    body = BASIC.replace('name = "basic"', f'name = "basic"\nsave_models = {str(save).lower()}')
    recipe = write_recipe(body.replace("seeds = [0, 1]", "seeds = [0]") if save else body)  # saving costs a reload
    out = tmp_path / "run"
    res = cli.invoke(app, ["run", str(recipe), "-o", str(out)])
    assert res.exit_code == 0, res.output
    return recipe, out


def cells(out) -> dict[str, dict]:
    """(quantizer bits, distiller, seed) → the cell folder and record of each quantized cell."""
    found = {}
    for f in out.glob("cells/*/result.json"):
        r = json.loads(f.read_text())
        if r["settings"]["quantizer"]:
            key = (r["settings"]["quantizer"]["params"]["bits"], r["settings"]["distiller"]["name"], r["settings"]["seed"])
            found[key] = f.parent
    return found


def test_damaged_records_are_named_with_the_rows_they_shorten_and_a_rerun_recomputes_them(run):
    recipe, out = run
    c = cells(out)
    truncated, deleted, binary = c[(2, "nudge", 1)], c[(2, "keep", None)], c[(8, "nudge", 0)]
    text = (truncated / "result.json").read_text()
    (truncated / "result.json").write_text(text[: len(text) // 2])
    (deleted / "result.json").unlink()
    (binary / "result.json").write_bytes(b"\xff\xfe" + (binary / "result.json").read_bytes())

    assert len(load_run(out)) == 4  # readable records only, and no crash on the binary one
    notes = "\n".join(damage_notes(out))
    assert f"damaged cell {truncated.name}" in notes and "result.json: not valid JSON" in notes
    assert f"{deleted.name}" in notes and "result.json: missing" in notes and "Δ PTQ and recovered" in notes
    assert f"{binary.name}" in notes and "not UTF-8" in notes and "one seed fewer" in notes

    for fmt, every in (("table", "3 damaged cells"), ("markdown", "**3 damaged cells"), ("json", '"kind":"damaged"')):
        res = cli.invoke(app, ["report", str(out), "--format", fmt], env={"COLUMNS": "300"})
        assert res.exit_code == 0 and all(c.name in res.output for c in (truncated, deleted, binary)), res.output
        assert every in res.output.replace('": "', '":"'), res.output
    res = cli.invoke(app, ["plan", str(recipe), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert res.output.count("damaged") >= 6  # three rows, three lines
    res = cli.invoke(app, ["run", str(recipe), "-o", str(out)])
    assert res.exit_code == 0, res.output
    for cell in (truncated, deleted, binary):
        assert f"cell {cell.name}" in res.output and "running it again" in res.output
        assert json.loads((cell / "result.json").read_text())["status"] == "done"
    assert (truncated / "result.json.damaged").read_text() == text[: len(text) // 2]  # kept aside, as it was
    assert damage_notes(out) == [] and len(load_run(out)) == 7


@pytest.mark.save_models
def test_changed_items_and_model_files_are_noticed_by_plan_compare_and_export_and_rerun(run):
    recipe, out = run
    c = cells(out)
    items_cell, model_cell = c[(2, "nudge", 0)], c[(8, "nudge", 0)]
    (items_cell / "items.json").write_text('{"format": 2, "tasks": {"probe": {"ids": [')
    weights = model_cell / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])

    notes = "\n".join(damage_notes(out))
    assert "items.json: " in notes and "`--compare` cannot pair its items" in notes
    assert "model/model.safetensors: 100 bytes, not" in notes
    res = cli.invoke(app, ["report", str(out), "--compare", "bits=2,distiller=nudge", "bits=8,distiller=nudge"])
    assert res.exit_code != 0 and "items.json is damaged" in res.output and items_cell.name in res.output
    res = cli.invoke(app, ["export", str(out), model_cell.name, "--to", str(out.parent / "exported")])
    assert res.exit_code != 0 and "is not what the run wrote" in res.output and "run the recipe again" in res.output
    assert not (out.parent / "exported").exists()

    res = cli.invoke(app, ["run", str(recipe), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert (model_cell / "model.damaged" / "model.safetensors").stat().st_size == 100
    assert (model_cell / "model" / "model.safetensors").stat().st_size > 100 and damage_notes(out) == []
    res = cli.invoke(app, ["export", str(out), model_cell.name, "--to", str(out.parent / "exported")])
    assert res.exit_code == 0, res.output


def test_plan_tells_a_running_cell_from_an_interrupted_one(run):
    recipe, out = run
    cell = cells(out)[(2, "nudge", 0)]
    record = json.loads((cell / "result.json").read_text())
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for pid, expected in ((int(gone.stdout), "interrupted"), (os.getpid(), "running")):
        running = {**record, "status": "running", "provenance": {**record["provenance"], "pid": pid}}
        (cell / "result.json").write_text(json.dumps(running))
        res = cli.invoke(app, ["plan", str(recipe), "-o", str(out)], env={"COLUMNS": "250"})
        assert res.exit_code == 0, res.output
        row = next(line for line in res.output.splitlines() if cell.name in line)
        assert expected in row and ("its process is gone" in res.output) is (expected == "interrupted"), res.output


def test_export_states_the_real_reason_a_model_was_not_saved(test_plugins, write_recipe, tmp_path):
    import unsavable as plugin

    from qcompare.sdk.registry import add_plugin, remove_plugin

    add_plugin(plugin)
    try:
        recipe = write_recipe(BASIC.replace('name = "rtn"\nbits = [8, 2]', 'name = "unsavable"\nbits = 8')
                              .replace("seeds = [0, 1]", "seeds = [0]\nteacher = false\nsave_models = true"))
        out = tmp_path / "run"
        res = cli.invoke(app, ["run", str(recipe), "-o", str(out)])
        assert res.exit_code == 1 and "models were not saved" in res.output
        [cell] = [p.parent.name for p in out.glob("cells/*/result.json")
                  if json.loads(p.read_text())["settings"]["distiller"]["name"] == "nudge"]
        res = cli.invoke(app, ["export", str(out), cell, "--to", str(tmp_path / "exported")])
    finally:
        remove_plugin(plugin)
    assert "was not saved during the run (saving it failed: unsavable: this variant has no on-disk format)" in res.output
    assert res.exit_code != 0 and not (tmp_path / "exported").exists()  # the rebuild cannot save it either
