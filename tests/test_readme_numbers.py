"""The README's numbers are a run's: scripts/readme_numbers.py writes them from the shipped reference
run of the demo (docs/reference/toy_int4), and the demo reproduces that run's cells."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # runs whole cells, runs or commands (not in the fast subset)

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("readme_numbers", ROOT / "scripts" / "readme_numbers.py")
readme_numbers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(readme_numbers)


def generated_blocks(text: str) -> dict[str, str]:
    return {m["name"]: m[0] for m in readme_numbers.MARKER.finditer(text)}


def test_the_readme_quotes_the_reference_run_as_the_code_reports_it_today():
    text = readme_numbers.README.read_text()
    expected = readme_numbers.splice(text, readme_numbers.blocks(readme_numbers.REFERENCE))
    # block by block, so a failure shows which text moved; then the whole file
    assert generated_blocks(text) == generated_blocks(expected), \
        "README.md's numbers are stale: run .venv/bin/python scripts/readme_numbers.py"
    assert text == expected


def test_the_reference_run_is_a_whole_run_of_the_demo_recipe():
    from qcompare.engine.cells import expand
    from qcompare.engine.recipe import load_recipe
    from qcompare.results.store import open_run

    store = open_run(readme_numbers.REFERENCE)
    assert store.recipe.read_text() == readme_numbers.RECIPE.read_text(), \
        "recipes/toy_int4.toml changed: run .venv/bin/python scripts/readme_numbers.py --run"
    assert set(store.cell_ids()) == {c.id for c in expand(load_recipe(readme_numbers.RECIPE))}
    assert all(r.done for r in store.records())
    assert store.damaged() == []  # every file a record names is shipped, as the run wrote it


def _reference_cell(store, bits: int, distiller: str, **params):
    return next(r for r in store.records() if r.settings.quantizer and r.settings.quantizer.params["bits"] == bits
                and r.settings.distiller.name == distiller
                and all(r.settings.distiller.params.get(k) == v for k, v in params.items() if k != "seed")
                and r.settings.seed == params.get("seed"))


def test_the_demo_reproduces_the_reference_runs_cells(tmp_path):
    """The INT2 untrained cell and the INT2 GKD λ=0 cell (seed 0), the two ends of the README's story,
    run again from the demo recipe. Every accuracy, size and per-item score comes out identical. The
    KL to the teacher is a float32 sum whose order follows torch's thread count: the reference ran
    with torch's default threads on its 2 CPUs, where a rerun matches it exactly too (checked by hand);
    with OMP_NUM_THREADS=1, as the tests run, KL moves in its 7th digit (1e-7 relative), hence the
    tolerance on KL alone. The reference cell read the teacher from the run's teacher cache; the rerun
    computes it, so this also checks the cache changes nothing."""
    from qcompare.engine.cells import expand
    from qcompare.engine.recipe import load_recipe
    from qcompare.engine.runner import Runner
    from qcompare.results.store import RunStore, open_run

    reference = open_run(readme_numbers.REFERENCE)
    recipe = load_recipe(readme_numbers.RECIPE)
    cells = {c.id: c for c in expand(recipe)}
    runner = Runner(recipe, RunStore(tmp_path / "run"))
    for ref in (_reference_cell(reference, 2, "none"), _reference_cell(reference, 2, "gkd", lmbda=0.0, seed=0)):
        record = runner.run_cell(cells[ref.id])
        assert record.done, record.error
        assert record.size == ref.size
        assert record.metrics.keys() == ref.metrics.keys()
        for name, value in record.metrics.items():
            if name.endswith("/kl"):
                assert value == pytest.approx(ref.metrics[name], rel=1e-6, abs=0), name
            else:
                assert value == ref.metrics[name], f"{ref.label}: {name}"
        items, ref_items = runner.store.cell(ref.id).read_items(), reference.cell(ref.id).read_items()
        assert items.keys() == ref_items.keys()
        for task, it in items.items():
            assert it.ids == ref_items[task].ids and it.weights == ref_items[task].weights
            for metric, scores in it.metrics.items():
                if metric == "kl":
                    assert all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7)
                               for a, b in zip(scores, ref_items[task].metrics[metric], strict=True)), task
                else:
                    assert scores == ref_items[task].metrics[metric], f"{ref.label}: {task}/{metric}"
        assert json.loads(runner.store.cell(ref.id).settings.read_text()) == \
            json.loads(reference.cell(ref.id).settings.read_text())
