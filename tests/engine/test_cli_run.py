"""End to end through the CLI with the example RTN quantizer and the test plugins."""

import json

from typer.testing import CliRunner

from conftest import BASIC
from qcompare import hookimpl
from qcompare.cli import app
import pytest

pytestmark = pytest.mark.e2e  # runs whole cells, runs or commands (not in the fast subset)

cli = CliRunner()


def run(*args):
    return cli.invoke(app, [str(a) for a in args])


def test_run_stores_every_cell_and_prints_table(test_plugins, write_recipe, tmp_path):
    recipe = write_recipe(BASIC)
    out = tmp_path / "run"
    res = run("run", recipe, "--output", out)
    assert res.exit_code == 0, res.output
    cells = sorted((out / "cells").iterdir())
    # teacher + 2 bits × (keep once + nudge × 2 seeds)
    assert len(cells) == 1 + 2 * (1 + 2)
    records = [json.loads((c / "result.json").read_text()) for c in cells]
    assert all(r["status"] == "done" for r in records)
    teacher = next(r for r in records if r["settings"]["quantizer"] is None)
    assert teacher["metrics"]["probe/kl"] == 0.0
    int2 = [r for r in records if r["settings"]["quantizer"] and r["settings"]["quantizer"]["params"]["bits"] == 2]
    int8 = [r for r in records if r["settings"]["quantizer"] and r["settings"]["quantizer"]["params"]["bits"] == 8]
    assert min(r["metrics"]["probe/kl"] for r in int2) > max(r["metrics"]["probe/kl"] for r in int8)
    trained = next(r for r in int2 if r["settings"]["distiller"]["name"] == "nudge")
    folder = out / "cells" / trained["id"]
    assert [json.loads(line)["step"] for line in (folder / "train_log.jsonl").read_text().splitlines()] == [1, 2]
    for name in ("settings.json", "cost.json", "items.json"):
        assert (folder / name).is_file()
    prov = trained["provenance"]
    assert prov["versions"]["torch"] and trained["started_at"] and trained["finished_at"]
    assert trained["size"]["bits_per_weight"] == 2 + 32 / 16
    assert (out / "recipe.toml").read_text() == recipe.read_text()
    assert "rtn(bits=2) · nudge" in res.output and "average" in res.output and "size and cost" in res.output


def test_rerun_skips_finished_cells(test_plugins, write_recipe, tmp_path):
    recipe = write_recipe(BASIC)
    out = tmp_path / "run"
    assert run("run", recipe, "-o", out).exit_code == 0
    stamps = {c.name: (c / "result.json").stat().st_mtime_ns for c in (out / "cells").iterdir()}
    res = run("run", recipe, "-o", out, "--set", "seeds=[0,1,2]")
    assert res.exit_code == 0, res.output
    now = {c.name: (c / "result.json").stat().st_mtime_ns for c in (out / "cells").iterdir()}
    assert {k: now[k] for k in stamps} == stamps  # nothing stored was touched
    assert len(now) - len(stamps) == 2  # only the new seed's nudge cells ran


def test_failing_cell_is_stored_and_sweep_goes_on(test_plugins, write_recipe, tmp_path):
    recipe = write_recipe(BASIC.replace("max_steps = 2", "max_steps = 1\nfail = [false, true]"))
    out = tmp_path / "run"
    res = run("run", recipe, "-o", out)
    assert res.exit_code == 1
    records = [json.loads((c / "result.json").read_text()) for c in (out / "cells").iterdir()]
    failed = [r for r in records if r["status"] == "failed"]
    assert len(failed) == 2 * 2 and all("nudge was asked to fail" in r["error"] for r in failed)
    # seeded and deterministic: the line and the record say that running again fails the same way
    assert all(r["rerun_helps"] is False for r in failed)
    assert res.output.count("a re-run fails the same way") == 2 * len(failed)  # as each ended, and in the report
    assert "4 fail the same way until the recipe or a plugin changes" in res.output
    assert all((out / "cells" / r["id"] / "traceback.txt").read_text().startswith("Traceback") for r in failed)
    assert sum(r["status"] == "done" for r in records) == 1 + 2 * (1 + 2)


def test_plan_shows_cells_and_done_status(test_plugins, write_recipe, tmp_path):
    recipe = write_recipe(BASIC)
    out = tmp_path / "run"
    res = run("plan", recipe, "-o", out)
    assert res.exit_code == 0, res.output
    assert res.output.count(" pending ") == 7 and not out.exists()
    run("run", recipe, "-o", out, "--set", "seeds=[0]")
    res = run("plan", recipe, "-o", out)
    assert res.output.count(" done ") == 5 and res.output.count(" pending ") == 2


def test_report_prints_stored_metrics(test_plugins, write_recipe, tmp_path):
    out = tmp_path / "run"
    run("run", write_recipe(BASIC), "-o", out, "--set", "seeds=[0]")
    res = run("report", out)
    assert res.exit_code == 0 and "teacher" in res.output and "rtn(bits=2" in res.output
    assert run("report", tmp_path).exit_code == 2


class Meddle:
    """A distiller that rebinds things on the teacher, as trainers do (accelerate wraps forward)."""

    @hookimpl
    def register_distillers(self, register):
        import torch

        from qcompare.sdk.api import Distiller, DistillResult

        class MeddlingDistiller(Distiller):
            name = "meddle"
            seeded = False  # it trains nothing (a seeded distiller must reach the quantized weights)

            def distill(self, student, params, context):
                teacher = context.teacher
                teacher.forward = lambda *a, **k: None
                teacher.to(torch.bfloat16).train()
                return DistillResult(student)

        register(MeddlingDistiller)


def test_a_distiller_cannot_change_the_teacher_later_cells_use(test_plugins, write_recipe, tmp_path):
    import torch

    from qcompare.sdk.registry import add_plugin, remove_plugin
    from qcompare.engine.recipe import load_recipe
    from qcompare.engine.runner import Runner
    from qcompare.results.store import RunStore

    meddle = Meddle()
    add_plugin(meddle)
    try:
        recipe = load_recipe(write_recipe(BASIC.replace('name = "keep"', 'name = "meddle"')), ["seeds=[0]"])
        runner = Runner(recipe, RunStore(tmp_path / "run"))
        records = runner.run()
    finally:
        remove_plugin(meddle)
    assert all(r.done for r in records)
    teacher = runner.inputs.teacher(recipe.models[0])[0]
    assert "forward" not in teacher.__dict__ and not teacher.training
    assert {p.dtype for p in teacher.parameters()} == {torch.float32}
    # the cells after the meddling ones saw the same teacher: int8 stays at KL ~0
    int8 = [r for r in records if r.settings.quantizer and r.settings.quantizer.params["bits"] == 8]
    assert all(r.metrics["probe/kl"] < 1e-3 for r in int8)


def test_which_failures_a_rerun_can_change():
    import torch

    from qcompare.sdk.checks import CheckFailed
    from qcompare.errors import QcompareError, transient

    assert transient(MemoryError()) and transient(torch.OutOfMemoryError("CUDA out of memory"))
    assert transient(OSError(28, "No space left on device")) and transient(ConnectionError())
    assert not transient(QcompareError("bad group size")) and not transient(ValueError("nan loss"))
    assert not transient(CheckFailed("fake_vs_converted: 0.3 > 0", "fake_vs_converted", {"passed": False}))


class Scribble:
    """A distiller that writes into the teacher it is given (the shared weights), as a LoRA distiller that
    forgot to unshare a trainable weight would."""

    @hookimpl
    def register_distillers(self, register):
        import torch

        from qcompare.sdk.api import Distiller, DistillResult

        class ScribblingDistiller(Distiller):
            name = "scribble"
            seeded = False

            def distill(self, student, params, context):
                teacher = context.teacher
                with torch.no_grad():
                    teacher.lm_head.weight.mul_(1.5)
                return DistillResult(student)

        register(ScribblingDistiller)


def test_a_cell_that_writes_into_the_teacher_fails_and_later_cells_get_it_back(test_plugins, write_recipe, tmp_path,
                                                                               tiny_model_dir):
    import torch
    from safetensors.torch import load_file

    from qcompare.sdk.registry import add_plugin, remove_plugin
    from qcompare.engine.recipe import load_recipe
    from qcompare.engine.runner import Runner
    from qcompare.results.store import RunStore

    scribble = Scribble()
    add_plugin(scribble)
    try:  # cells run in recipe order: the scribbling distiller first, then keep and nudge
        body = BASIC.replace('name = "keep"', 'name = "scribble"\n[[distillers]]\nname = "keep"')
        recipe = load_recipe(write_recipe(body), ["seeds=[0]", "quantizers[0].bits=[8]"])
        runner = Runner(recipe, RunStore(tmp_path / "run"))
        records = runner.run()
    finally:
        remove_plugin(scribble)
    by = {(r.settings.distiller.name if r.settings.distiller else "teacher"): r for r in records}
    assert by["scribble"].status == "failed" and by["scribble"].error.startswith(
        "teacher: this cell wrote into the teacher it shares with the run's other cells (1 tensors, e.g. lm_head.weight)")
    assert by["keep"].done and by["nudge"].done
    # the cells after it were given the teacher as it is on disk, loaded anew
    teacher = runner.inputs.teacher(recipe.models[0])[0]
    assert torch.equal(teacher.lm_head.weight, load_file(tiny_model_dir / "model.safetensors")["lm_head.weight"])


class ScribblingEvaluator:
    """An evaluator that writes into the teacher while it scores a quantized model."""

    @hookimpl
    def register_evaluators(self, register):
        import torch

        from qcompare.sdk import EvalResult, Evaluator

        class Scribbler(Evaluator):
            name = "scribbler"

            def evaluate(self, model, params, context):
                if model is not context.teacher:
                    with torch.no_grad():
                        context.teacher.lm_head.weight.mul_(1.5)
                return EvalResult(metrics={"scribbled/x": 0.0})

        register(Scribbler)


def test_an_evaluator_that_writes_into_the_teacher_fails_its_cell_too(test_plugins, write_recipe, tmp_path):
    from qcompare.engine.recipe import load_recipe
    from qcompare.engine.runner import Runner
    from qcompare.results.store import RunStore
    from qcompare.sdk import add_plugin, remove_plugin

    scribbler = ScribblingEvaluator()
    add_plugin(scribbler)
    try:  # the teacher is checked once every plugin call of the cell has returned, not only after distill
        body = BASIC.replace('name = "probe"', 'name = "probe"\n[[evaluators]]\nname = "scribbler"')
        recipe = load_recipe(write_recipe(body), ["seeds=[0]", "quantizers[0].bits=[8]", "distillers[1].max_steps=1"])
        records = Runner(recipe, RunStore(tmp_path / "run")).run()
    finally:
        remove_plugin(scribbler)
    quantized = [r for r in records if r.settings.distiller]
    assert quantized and all(r.status == "failed" and r.error.startswith("teacher: this cell wrote into the teacher")
                             for r in quantized), [(r.status, r.error) for r in quantized]
    assert [r.done for r in records if not r.settings.distiller] == [True]
