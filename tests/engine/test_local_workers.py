"""The local executor with ``workers = 2``: cells in two worker processes, the same results as
one after another, and a worker that dies loses only the cells it had not finished."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from conftest import BASIC
from qcompare.cli import app
import pytest

pytestmark = pytest.mark.e2e  # runs whole cells, runs or commands (not in the fast subset)

cli = CliRunner()


def records(run) -> dict:
    return {c.name: json.loads((c / "result.json").read_text()) for c in (run / "cells").iterdir()}


def test_two_workers_give_the_same_results_as_one(test_plugins, write_recipe, tmp_path):
    recipe = write_recipe(BASIC)
    res = cli.invoke(app, ["run", str(recipe), "-o", str(tmp_path / "serial")])
    assert res.exit_code == 0, res.output
    res = cli.invoke(app, ["run", str(recipe), "-o", str(tmp_path / "parallel"), "--set", "executor.workers=2"])
    assert res.exit_code == 0, res.output
    serial, parallel = records(tmp_path / "serial"), records(tmp_path / "parallel")
    assert serial.keys() == parallel.keys() and len(serial) == 7
    for cell, r in serial.items():
        assert parallel[cell]["status"] == "done"
        assert parallel[cell]["metrics"] == r["metrics"]  # exactly: same seeds, same code, other processes
    # the parallel cells ran in processes other than this one
    assert {r["provenance"]["processes"] for r in parallel.values()} == {1}
    assert "average" in res.output  # the report is printed as usual


def test_a_worker_that_dies_loses_only_its_unfinished_cells(test_plugins, write_recipe, tmp_path):
    marker = tmp_path / "killed-once"
    recipe = write_recipe(BASIC.replace("max_steps = 2", f'max_steps = 2\nkill_once = ["", "{marker}"]')
                          + "\n[executor]\nworkers = 2\n")
    run = tmp_path / "run"
    res = cli.invoke(app, ["run", str(recipe), "-o", str(run)])
    assert res.exit_code == 1 and marker.exists()
    first = records(run)
    died = [r for r in first.values() if r["status"] == "failed"]
    assert died and all("worker process died" in r["error"] for r in died) and len(died) <= 2
    done = {k: (run / "cells" / k / "result.json").stat().st_mtime_ns for k, r in first.items() if r["status"] == "done"}
    # the sweep went on in a new pool: every cell ended, none was left "running" or not started
    assert len(first) == 11 and all(r["status"] in ("done", "failed") for r in first.values())

    res = cli.invoke(app, ["run", str(recipe), "-o", str(run)])
    assert res.exit_code == 0, res.output
    second = records(run)
    assert len(second) == 1 + 2 * (1 + 2 * 2) and all(r["status"] == "done" for r in second.values())
    assert {k: (run / "cells" / k / "result.json").stat().st_mtime_ns for k in done} == done  # untouched


def test_workers_is_validated(test_plugins, write_recipe):
    recipe = write_recipe(BASIC + "\n[executor]\nworkers = 0\n")
    res = cli.invoke(app, ["validate", str(recipe)])
    assert res.exit_code == 2 and "executor.workers" in res.output and "greater than or equal to 1" in res.output


def test_workers_that_die_before_any_cell_stop_the_run_with_one_line(test_plugins, write_recipe, tmp_path, monkeypatch):
    import os

    from qcompare_plugins import local_executor

    monkeypatch.setattr(local_executor, "_start_worker", lambda *args: os._exit(3))  # forked workers inherit it
    recipe = write_recipe(BASIC + "\n[executor]\nworkers = 2\n")
    res = cli.invoke(app, ["run", str(recipe), "-o", str(tmp_path / "run")])
    assert res.exit_code == 2
    assert "worker processes died before running any cell (7 left pending)" in res.output


def test_a_forked_worker_builds_its_own_runner_not_the_drivers_display(test_plugins, write_recipe, tmp_path):
    # A fork copies the driver's runner with its live progress display; a display whose refresh
    # thread held its lock at the fork hangs the worker's first progress bar forever (seen: a
    # cell "running" for good under workers = 2). The worker must build a runner of its own.
    import multiprocessing
    import threading

    from qcompare.sdk.api import CellProgress
    from qcompare.engine.recipe import load_recipe
    from qcompare.engine.runner import CellJob, Runner
    from qcompare.results.store import RunStore

    held = threading.Lock()

    def start(description, total):  # the driver's display: needs its lock
        with held:
            return (lambda n=1: None), (lambda: None)

    runner = Runner(load_recipe(write_recipe(BASIC)), RunStore(tmp_path / "run"), progress=CellProgress(start))
    job = CellJob(runner)
    answers = multiprocessing.get_context("fork").Queue()

    def worker():
        mine = job.runner
        with mine.progress.task("step", 2) as advance:  # would block on the inherited lock
            advance()
        answers.put(mine is not runner)

    with held:  # held by the driver at the moment of the fork
        child = multiprocessing.get_context("fork").Process(target=worker)
        child.start()
    child.join(60)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 0 and answers.get(timeout=5) is True
