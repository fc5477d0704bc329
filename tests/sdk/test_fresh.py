"""The reload check's fresh Pythons come from one helper that did the imports once: each script
still runs in a Python that owes nothing to this process nor to the scripts before it."""

import os
import signal

import pytest

from qcompare.sdk import fresh

PEEK = """
import json, os, sys
print(json.dumps({"pid": os.getpid(), "argv": sys.argv[1:], "env": os.environ.get("QCOMPARE_FRESH_TEST"),
                  "qcompare": [m for m in sys.modules if m.split(".")[0] in ("qcompare", "qcompare_plugins")],
                  "json_mark": getattr(json, "mark", None),
                  "preloaded": [m for m in ("torch", "transformers") if m in sys.modules]}))
json.mark = "left by an earlier script"
"""


def _peek(tmp_path, env, name="log"):
    import json

    code, output = fresh.run(PEEK, ["a", "b c"], env, tmp_path / f"{name}.txt")
    assert code == 0, output
    return json.loads(output.splitlines()[-1])


def test_each_script_runs_in_a_fresh_python_forked_from_one_helper(tmp_path):
    env = {**os.environ, "QCOMPARE_FRESH_TEST": "1"}
    first, second = _peek(tmp_path, env, "one"), _peek(tmp_path, env, "two")
    helper = fresh._helper["process"]
    assert first["pid"] != second["pid"] != os.getpid() and helper.poll() is None
    assert first["argv"] == ["a", "b c"] and first["env"] == "1"
    # nothing of qcompare's, nor what an earlier script changed in a module the helper had imported
    assert first["qcompare"] == [] and second["qcompare"] == [] and second["json_mark"] is None
    assert "transformers" in first["preloaded"]


def test_another_environment_is_another_helper(tmp_path, light):
    # variables read at import time (HF_HUB_OFFLINE, OMP_NUM_THREADS) must take effect
    env = {**os.environ, "QCOMPARE_FRESH_TEST": "light"}
    _peek(tmp_path, env, "one")
    helper = fresh._helper["process"]
    second = _peek(tmp_path, {**env, "QCOMPARE_FRESH_TEST": "2"}, "two")
    assert second["env"] == "2" and fresh._helper["process"] is not helper and helper.poll() is not None
    # but pytest's name of the current test is read by no import: the same helper, the script sees the new value
    helper = fresh._helper["process"]
    code, output = fresh.run("import os; print(os.environ['PYTEST_CURRENT_TEST'])", [],
                             {**env, "QCOMPARE_FRESH_TEST": "2", "PYTEST_CURRENT_TEST": "another"}, tmp_path / "three.txt")
    assert (code, output.strip()) == (0, "another") and fresh._helper["process"] is helper


@pytest.fixture
def light(monkeypatch):
    """A helper that preloads nothing: the same mechanics, without five seconds of imports."""
    monkeypatch.setattr(fresh, "PRELOAD", "")


def test_a_script_that_fails_or_crashes_gives_its_code_and_output_and_the_next_one_runs(tmp_path, light):
    env = {**os.environ, "QCOMPARE_FRESH_TEST": "light"}
    code, output = fresh.run("raise ValueError('the folder is broken')", [], env, tmp_path / "raise.txt")
    assert code == 1 and "ValueError: the folder is broken" in output
    code, output = fresh.run("import sys; print('bye'); sys.exit(3)", [], env, tmp_path / "exit.txt")
    assert (code, output.strip()) == (3, "bye")
    code, _ = fresh.run("import os; os.kill(os.getpid(), 9)", [], env, tmp_path / "kill.txt")
    assert code == -signal.SIGKILL
    assert _peek(tmp_path, env)["argv"] == ["a", "b c"]


def test_a_helper_that_died_is_replaced_and_its_script_still_runs(tmp_path, light):
    env = {**os.environ, "QCOMPARE_FRESH_TEST": "light"}
    _peek(tmp_path, env, "before")
    fresh._helper["process"].kill()
    fresh._helper["process"].wait()
    assert _peek(tmp_path, env, "after")["argv"] == ["a", "b c"]
    assert fresh._helper["process"].poll() is None


def test_where_the_helper_cannot_start_each_script_runs_in_a_new_interpreter(tmp_path, monkeypatch):
    monkeypatch.setattr(fresh, "_HELPER", "raise SystemExit(1)")
    env = {**os.environ, "QCOMPARE_FRESH_TEST": "no helper"}
    assert _peek(tmp_path, env)["env"] == "no helper"
    assert fresh._helper["process"] is None  # and is not tried again for this environment
