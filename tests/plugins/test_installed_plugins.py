"""The third-party path, proven with real installs and real processes.

The example package is pip-installed into a folder on PYTHONPATH, so qcompare finds it
only through its entry point; the test plugins get a minimal distribution of their own.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import EXAMPLE_NF3, EXAMPLE_RTN

pytestmark = pytest.mark.e2e  # runs whole cells, runs or commands (not in the fast subset)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"  # the test plugins


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    sources = tmp_path_factory.mktemp("src")
    for example in (EXAMPLE_RTN, EXAMPLE_NF3):
        source = sources / example.name
        shutil.copytree(example, source)  # building writes into the source folder; keep the repo's clean
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", str(target), str(source)], check=True)
    info = target / "qcompare_testplugins-0.0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: qcompare-testplugins\nVersion: 0.0.0\n")
    (info / "entry_points.txt").write_text("[qcompare]\ntestplugins = testplugins\n")
    (info / "top_level.txt").write_text("testplugins\n")
    return target


def qcompare(site, *args, wait=True, **env_extra):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(FIXTURES)]),
           "QCOMPARE_PLUGINS": "local,ray,rtn,testplugins", "COLUMNS": "200", **env_extra}
    cmd = [sys.executable, "-m", "qcompare", *map(str, args)]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_installed_plugin_is_listed_with_its_package_and_parameters(site):
    res = qcompare(site, "plugins")
    assert res.returncode == 0, res.stderr
    assert "quantizer rtn" in res.stdout and "qcompare-rtn" in res.stdout
    assert "group_size" in res.stdout and "weights sharing one scale" in res.stdout


def test_a_folder_in_an_installed_plugins_format_loads_through_its_entry_point_alone(site, tiny_model_dir, tmp_path):
    recipe = tmp_path / "nf3.toml"
    recipe.write_text(f"""
name = "nf3"
models = ["{tiny_model_dir}"]
teacher = false
save_models = true
[[quantizers]]
name = "nf3"
group_size = 32
[[distillers]]
name = "none"
[[evaluators]]
name = "probe"
""")
    out = tmp_path / "run"
    res = qcompare(site, "run", recipe, "-o", out, QCOMPARE_PLUGINS="local,distillers,testplugins,nf3")
    assert res.returncode == 0, res.stderr
    [record] = _results(out).values()
    assert record["status"] == "done" and "save_error" not in record and record["checks"]["reload"]["passed"]
    folder = out / "cells" / record["id"] / "model"
    own = json.loads((folder / "qcompare_format.json").read_text())
    assert (own["package"], own["version"], own["entry_point"]) == ("qcompare-nf3", "0.1.0", "nf3")
    # a user's fresh Python that loads no plugin at all: the folder names its entry point
    code = (f"import qcompare; m = qcompare.load_pretrained({str(folder)!r}); "
            "print(type(m.model.layers[0].mlp.down_proj).__name__)")
    env = {**os.environ, "PYTHONPATH": str(site), "QCOMPARE_PLUGINS": ""}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.split()[-1] == "NF3Linear", done.stderr[-2000:]


RECIPE = """
name = "killed"
models = ["{model}"]
[[quantizers]]
name = "rtn"
bits = [8, 4, 2]
group_size = 16
[[distillers]]
name = "nudge"
max_steps = 3
sleep = 0.4
[[evaluators]]
name = "probe"
"""


def _results(out: Path) -> dict[str, dict]:
    found = {}
    for f in out.glob("cells/*/result.json"):
        found[f.parent.name] = json.loads(f.read_text())
    return found


def test_kill_9_midway_then_rerun_finishes_only_what_was_missing(site, tiny_model_dir, tmp_path):
    recipe = tmp_path / "killed.toml"
    recipe.write_text(RECIPE.replace("{model}", str(tiny_model_dir)))
    out = tmp_path / "run"
    proc = qcompare(site, "run", recipe, "-o", out, wait=False)
    deadline = time.time() + 240
    while time.time() < deadline:
        done = {k for k, r in _results(out).items() if r["status"] == "done"}
        if len(done) >= 2:
            break
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _results(out)
    done_before = {k: (out / "cells" / k / "result.json").read_bytes() for k, r in before.items() if r["status"] == "done"}
    assert 2 <= len(done_before) < 4, "the kill should land while a cell is running"

    res = qcompare(site, "run", recipe, "-o", out)
    assert res.returncode == 0, res.stderr
    after = _results(out)
    assert len(after) == 4 and all(r["status"] == "done" for r in after.values())
    for k, blob in done_before.items():  # finished cells were skipped, byte for byte
        assert (out / "cells" / k / "result.json").read_bytes() == blob
    assert f"{len(done_before)} cells already done" in res.stderr


def test_ray_runs_cells_in_resident_actors_one_that_dies_loses_only_its_cell_and_a_rerun_resumes(site, tiny_model_dir, tmp_path):
    marker = tmp_path / "killed-once"
    recipe = tmp_path / "ray.toml"
    recipe.write_text(RECIPE.replace("{model}", str(tiny_model_dir)).replace("sleep = 0.4", f'kill_once = ["", "{marker}"]')
                      + '\n[executor]\nname = "ray"\nlocal_cpus = 1\n')  # one actor: cells one after another
    out = tmp_path / "run"
    ray_tmp = tempfile.mkdtemp(prefix="qr")  # Ray's socket paths must stay under 107 bytes
    ray_env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_TMPDIR": ray_tmp, "RAY_USAGE_STATS_ENABLED": "0"}
    res = qcompare(site, "run", recipe, "-o", out, **ray_env)
    assert res.returncode == 1 and marker.exists()
    first = _results(out)
    died = [r for r in first.values() if r["status"] == "failed"]
    assert len(died) == 1 and "Ray worker died" in died[0]["error"] and died[0]["rerun_helps"] is True
    done = {k: r for k, r in first.items() if r["status"] == "done"}
    assert len(done) == len(first) - 1 and all(r["provenance"]["host"] for r in done.values())
    # cells before the death share one process, cells after it another (the replacement actor)
    assert len({r["provenance"]["pid"] for r in done.values()}) == 2
    # the rerun, on a two-CPU loopback cluster set from the command line, runs only the cell that died
    res = qcompare(site, "run", recipe, "-o", out, "--set", "executor.local_cpus=2", **ray_env)
    assert res.returncode == 0, res.stderr
    assert f"{len(done)} cells already done" in res.stderr
    after = _results(out)
    assert len(after) == len(first) and all(r["status"] == "done" for r in after.values())
    assert all(after[k]["finished_at"] == r["finished_at"] for k, r in done.items())
    shutil.rmtree(ray_tmp, ignore_errors=True)
