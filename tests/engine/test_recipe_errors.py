"""Every kind of bad input gets one clear line per mistake, exit code 2, and no traceback."""

import pytest
from typer.testing import CliRunner

from conftest import BASIC
from qcompare.cli import app

cli = CliRunner()


def check(args, *expected, lines=1):
    res = cli.invoke(app, [str(a) for a in args])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == lines, res.output
    for text in expected:
        assert text in res.output, res.output
    return res.output


def test_missing_recipe_file(test_plugins, tmp_path):
    check(["validate", tmp_path / "nope.toml"], "recipe file not found", "nope.toml")


@pytest.mark.parametrize("kind, expected", [
    ("not utf-8", "is not UTF-8 text"),
    ("binary", "holds NUL bytes"),
    ("empty", "recipe file is empty"),
    ("whitespace", "recipe file is empty"),
    ("folder", "is a folder, not a TOML file"),
    ("unreadable", "cannot read the recipe file"),
])
def test_a_file_that_is_no_recipe_is_one_line(test_plugins, tmp_path, monkeypatch, kind, expected):
    path = tmp_path / "recipe.toml"
    if kind == "folder":
        path.mkdir()
    else:
        path.write_bytes({"not utf-8": b'name = "\xff\xfe"\n', "binary": b'name = "x"\x00\x01',
                          "empty": b"", "whitespace": b"\n  \n", "unreadable": b'name = "x"\n'}[kind])
    if kind == "unreadable":  # as root a chmod 000 file is still readable: fail the read itself
        from pathlib import Path

        real = Path.read_bytes
        monkeypatch.setattr(Path, "read_bytes", lambda self: (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
                            if self == path else real(self))
    for command in ("validate", "plan", "run"):
        check([command, path], expected, "recipe")


def test_toml_syntax_error_names_the_line(test_plugins, write_recipe):
    check(["validate", write_recipe('name = "x"\nmodels = [1,,]\nseeds = [0]\n')], "TOML syntax error", "line 2")


def test_unknown_top_level_field(test_plugins, write_recipe):
    check(["validate", write_recipe("modles = ['x']\n" + BASIC)], "modles: unknown top-level field", "allowed: name")


def test_unknown_plugin_suggests_the_closest(test_plugins, write_recipe):
    out = check(["validate", write_recipe(BASIC.replace('name = "nudge"', 'name = "nudgee"'))])
    assert "unknown distiller 'nudgee'" in out and "did you mean 'nudge'" in out and "keep" in out


def test_unknown_and_mistyped_parameters(test_plugins, write_recipe):
    body = BASIC.replace("max_steps = 2", "step = 2\nlearning_rate = 'fast'")
    out = check(["validate", write_recipe(body)], lines=2)
    assert "distillers[1].step: unknown parameter of distiller 'nudge'; allowed: max_steps, learning_rate" in out
    assert "distillers[1].learning_rate: bad value 'fast'" in out


@pytest.mark.parametrize("edit, expected", [
    (("bits = [8, 2]", "bits = [8, 5]"), "quantizers[0].bits: bad value 5: allowed: 2, 3, 4 or 8"),
    (("max_steps = 2", "max_steps = 2\nlearning_rate = -0.1"), "learning_rate: bad value -0.1: input should be greater than 0"),
    (("bits = [8, 2]", "bits = []"), "quantizers[0].bits: empty sweep list"),
])
def test_out_of_range_and_empty_values(test_plugins, write_recipe, edit, expected):
    check(["validate", write_recipe(BASIC.replace(*edit))], expected)


def test_every_mistake_is_reported_at_once(test_plugins, write_recipe):
    body = "extra = 1\n" + BASIC.replace("bits = [8, 2]", "bits = 5").replace("max_steps = 2", "max_steps = -1")
    out = check(["validate", write_recipe(body)], lines=3)
    assert "recipe.toml: quantizers[0].bits" in out and "distillers[1].max_steps" in out and "extra" in out


def test_recipe_that_expands_to_zero_cells(test_plugins, write_recipe):
    body = 'models = ["{model}"]\nteacher = false\n[[evaluators]]\nname = "probe"\n'
    check(["validate", write_recipe(body)], "expands to zero cells")


def test_an_empty_quantizers_list_and_distillers_without_quantizers_are_refused(test_plugins, write_recipe):
    body = 'models = ["{model}"]\n{q}[[distillers]]\nname = "nudge"\n[[evaluators]]\nname = "probe"\n'
    check(["validate", write_recipe(body.replace("{q}", "quantizers = []\n"))],
          "quantizers: an empty list; give at least one [[quantizers]] table")
    check(["validate", write_recipe(body.replace("{q}", ""))],
          "distillers: 1 [[distillers]] tables but no [[quantizers]]: distillers train quantized students")
    res = cli.invoke(app, ["validate", str(write_recipe('models = ["{model}"]\n[[evaluators]]\nname = "probe"\n'))])
    assert res.exit_code == 0, res.output  # a teacher-only run says so by leaving both out


def test_missing_local_data_file(test_plugins, write_recipe):
    check(["validate", write_recipe(BASIC + '\n[data]\ntrain = "missing/chat.jsonl"\n')],
          "data.train: file not found: missing/chat.jsonl")


def test_output_path_that_is_a_file(test_plugins, write_recipe, tmp_path):
    (tmp_path / "taken").write_text("x")
    check(["run", write_recipe(BASIC), "--output", tmp_path / "taken"], "is a file; give a folder path")


@pytest.mark.parametrize("assignment, expected", [
    ("seeds", "malformed --set 'seeds'"),
    ("quantizers[7].bits=4", "index 7 is outside the list of 1"),
    ("nosuch.field=1", "unknown top-level field"),
    ("name.x=1", "name = 'basic' is not a table; it has no field x"),
    ("seeds[0].a=1", "seeds.0 = 0 is not a table; it has no field a"),
])
def test_malformed_set(test_plugins, write_recipe, assignment, expected):
    check(["validate", write_recipe(BASIC), "--set", assignment], expected)


def test_set_overrides_a_field(test_plugins, write_recipe):
    res = cli.invoke(app, ["validate", str(write_recipe(BASIC)), "--set", "quantizers[0].bits=4", "--set", "seeds=[3]"])
    assert res.exit_code == 0 and "3 cells" in res.output, res.output  # teacher, keep, nudge × 1 seed


@pytest.mark.e2e
def test_nothing_stored_is_touched_by_bad_input(test_plugins, write_recipe, tmp_path):
    out = tmp_path / "run"
    assert cli.invoke(app, ["run", str(write_recipe(BASIC)), "-o", str(out), "--set", "seeds=[0]"]).exit_code == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    check(["run", write_recipe(BASIC.replace("bits = [8, 2]", "bits = 5")), "-o", out], "bits")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_gkd_lambda_and_beta_outside_0_1_are_named(monkeypatch, write_recipe):
    monkeypatch.setenv("QCOMPARE_PLUGINS", "local,torchao,distillers")
    body = 'models = ["{model}"]\n[[quantizers]]\nname = "torchao"\n[[distillers]]\nname = "gkd"\nlmbda = [0.0, 1.5]\nbeta = -0.1\n'
    out = check(["validate", write_recipe(body)], lines=2)
    assert "distillers[0].lmbda: bad value 1.5: input should be less than or equal to 1" in out
    assert "distillers[0].beta: bad value -0.1: input should be greater than or equal to 0" in out


@pytest.mark.e2e
def test_a_misspelled_lm_eval_task_is_refused_before_any_cell_runs(monkeypatch, tmp_path):
    monkeypatch.setenv("QCOMPARE_PLUGINS", "local,toy,torchao,evaluators,distillers")
    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "r"\nmodels = ["toy-qwen3"]\n[[quantizers]]\nname = "torchao"\n'
                      '[[evaluators]]\nname = "lm_eval"\ntasks = ["toy", "hellaswg"]\n')
    for command in ("validate", "run"):  # run refuses before its first cell: nothing is written
        check([command, recipe, "-o", tmp_path / "run"] if command == "run" else [command, recipe],
              "evaluators[0]: lm_eval: unknown task 'hellaswg' (did you mean 'hellaswag'?)")
    assert not (tmp_path / "run").exists()
    recipe.write_text(recipe.read_text().replace('"hellaswg"', '"hellaswag"'))  # lm-eval's own, and the toy group
    assert cli.invoke(app, ["validate", str(recipe)]).exit_code == 0


def test_a_model_id_the_hub_does_not_know_is_refused_and_an_unreachable_hub_is_said(test_plugins, write_recipe,
                                                                                    monkeypatch):
    import huggingface_hub

    from qcompare.engine import structure

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(structure, "_hub", {})

    def unknown(name, timeout=None):
        import httpx

        request = httpx.Request("GET", f"https://huggingface.co/api/models/{name}")
        raise huggingface_hub.errors.RepositoryNotFoundError(f"404: {name}", response=httpx.Response(404, request=request))

    monkeypatch.setattr(huggingface_hub, "model_info", unknown)
    recipe = write_recipe(BASIC.replace('models = ["{model}"]', 'models = ["Qwen/Qwen3-4B-Instruct-25077"]'))
    check(["validate", recipe], "models: 'Qwen/Qwen3-4B-Instruct-25077' is neither a folder here, a registered model, "
                                "nor a model on the Hugging Face Hub")

    def unreachable(name, timeout=None):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    res = cli.invoke(app, ["validate", str(recipe)])
    assert res.exit_code == 0 and "the Hugging Face Hub is not reachable (ConnectionError)" in res.output


def test_a_model_that_cannot_be_loaded_fails_once_and_later_cells_at_once(test_plugins, monkeypatch):
    from qcompare.engine import inputs as data
    from qcompare.errors import QcompareError
    from qcompare.engine.pipeline import InputCache
    from qcompare.sdk.registry import get_registry

    tries = []

    def slow_failure(name, registry, device):
        tries.append(name)
        raise QcompareError(f"cannot load model {name!r} (the hub is out of reach)")

    monkeypatch.setattr(data, "load_model", slow_failure)
    inputs = InputCache(get_registry(), "cpu")
    for _ in range(3):
        with pytest.raises(QcompareError, match=r"cannot load model 'org/model' \(the hub is out of reach\)"):
            inputs.teacher("org/model")
    assert tries == ["org/model"]  # tried once; the other cells fail at once with the same line
