"""What a run prints, fit for where it goes: in a log, a line as each cell starts and ends and
nothing else; what the libraries print goes to the cell's own output.log; --verbose shows it all."""

from __future__ import annotations

import logging
import os
import re
import sys

import pytest
from typer.testing import CliRunner

from conftest import BASIC
from qcompare import hookimpl
from qcompare.sdk.api import EvalResult, Evaluator
from qcompare.cli import app
from qcompare.sdk.registry import add_plugin, remove_plugin

pytestmark = pytest.mark.e2e  # runs whole cells, runs or commands (not in the fast subset)

cli = CliRunner()
LIBRARY = logging.getLogger("qcompare-test-library")  # a library's logger, with its own handler
HANDLERS: list = []


class Noisy(Evaluator):
    """Prints the way libraries do: print, a tqdm bar, a log record (through the handler a library
    sets up when it is first imported, here inside a cell), writes to the file descriptor."""

    name = "noisy"

    def evaluate(self, model, params, context):
        tokenizer = context.tokenizer
        from tqdm import tqdm

        print("PRINTED by a library")
        for _ in tqdm(range(3), desc="LIBRARY BAR", file=sys.stderr):
            pass
        if not HANDLERS:
            HANDLERS.append(logging.StreamHandler())  # takes sys.stderr as it is now
            LIBRARY.addHandler(HANDLERS[0])
            LIBRARY.propagate = False
        LIBRARY.warning("LIBRARY LOG")
        os.write(2, b"NATIVE WRITE\n")
        return EvalResult(metrics={"noise/acc": 0.5})


class NoisyPlugin:
    @hookimpl
    def register_evaluators(self, register):
        register(Noisy)


NOISE = ("PRINTED by a library", "LIBRARY BAR", "LIBRARY LOG")


@pytest.fixture
def noisy(test_plugins, write_recipe):
    plugin = NoisyPlugin()
    add_plugin(plugin)
    yield write_recipe(BASIC.replace('name = "probe"', 'name = "noisy"'))
    for handler in HANDLERS:
        LIBRARY.removeHandler(handler)
    HANDLERS.clear()
    remove_plugin(plugin)


def test_a_run_into_a_log_prints_a_line_per_cell_and_keeps_library_output_in_cell_logs(noisy, tmp_path):
    res = cli.invoke(app, ["run", str(noisy), "-o", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.output.split(": accuracy")[0].splitlines()[:-1] if ln.strip()]
    starts, ends = lines[0::2], lines[1::2]
    assert len(starts) == 7 and all(s.startswith("start ") for s in starts)
    for start, end in zip(starts, ends):  # nothing between: no bars, no warnings, no logs
        assert re.fullmatch(rf"{re.escape(start[6:])} — done — noise/acc 0\.500( · [0-9.]+ bits/weight)? · \d+ s",
                            end), end
    assert not any(n in res.output for n in NOISE)
    logs = [p.read_text() for p in (tmp_path / "run" / "cells").glob("*/output.log")]
    assert len(logs) == 7 and all(all(n in log for n in NOISE + ("NATIVE WRITE",)) for log in logs)


def test_verbose_shows_what_the_libraries_print(noisy, tmp_path):
    res = cli.invoke(app, ["run", str(noisy), "-o", str(tmp_path / "run"), "--verbose"])
    assert res.exit_code == 0, res.output
    assert all(n in res.output for n in NOISE), res.output
    assert not list((tmp_path / "run").glob("cells/*/output.log"))


def test_what_a_cell_hands_a_stream_keeps_working_after_it(tmp_path, capfd):
    from qcompare.engine.capture import cell_output

    with cell_output(tmp_path / "output.log"):
        late = logging.StreamHandler(sys.stderr)  # a library imported during the cell
    LIBRARY.addHandler(late)
    try:
        LIBRARY.warning("AFTER THE CELL")  # reaches the terminal again, not the closed log
    finally:
        LIBRARY.removeHandler(late)
    assert "AFTER THE CELL" in capfd.readouterr().err
    assert "AFTER THE CELL" not in (tmp_path / "output.log").read_text()
