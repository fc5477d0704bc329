"""Exported cells: a Hugging Face folder that reloads to the evaluated model, with a model card."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

import testplugins
from qcompare import hookimpl
from qcompare.sdk.api import EvalResult, Evaluator
from qcompare.cli import app
from qcompare.sdk.registry import add_plugin, remove_plugin

pytestmark = pytest.mark.e2e  # runs whole cells, runs or commands (not in the fast subset)

cli = CliRunner()
IDS = torch.randint(3, 400, (2, 12), generator=torch.Generator().manual_seed(7))


class Logits(Evaluator):
    """Test evaluator: keeps the evaluated model's logits on fixed tokens beside the cell."""

    name = "logits"

    def evaluate(self, model, params, context):
        tokenizer = context.tokenizer
        with torch.no_grad():
            logits = model(IDS).logits
        torch.save(logits, context.cell_dir / "logits.pt")
        return EvalResult(metrics={"probe/mean": logits.float().mean().item(), "check/spread": logits.float().std().item()},
                          stderr={"probe/mean": 0.01})


class LogitsPlugin:
    @hookimpl
    def register_evaluators(self, register):
        register(Logits)


@pytest.fixture
def toy_plugins(monkeypatch):
    """The toy model, torchao and the test distillers/evaluators; nothing heavier."""
    monkeypatch.setenv("QCOMPARE_PLUGINS", "local,toy,torchao")
    plugins = [testplugins, LogitsPlugin()]
    for p in plugins:
        add_plugin(p)
    yield
    for p in plugins:
        remove_plugin(p)


RECIPE = """
name = "exp"
models = ["toy-qwen3"]
seeds = [0]
teacher = false
{extra}

[[quantizers]]
name = "torchao"
bits = {bits}
group_size = 32

[[distillers]]
name = "nudge"
max_steps = 2

[[evaluators]]
name = "logits"
"""


def run_recipe(tmp_path, bits="4", extra=""):
    recipe = tmp_path / "exp.toml"
    recipe.write_text(RECIPE.format(bits=bits, extra=extra))
    out = tmp_path / "run"
    res = cli.invoke(app, ["run", str(recipe), "-o", str(out)])
    assert res.exit_code == 0, res.output
    return out, [json.loads(p.read_text()) for p in sorted(out.glob("cells/*/result.json"))]


def reload_model(folder):
    """The user's one line (a LoRA folder loads base and adapter together), and its logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        return model(IDS).logits, model


def reload(folder):
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(folder)  # the tokenizer travels too
    return reload_model(folder)


def test_saved_and_exported_torchao_cell_reloads_to_the_evaluated_logits(toy_plugins, tmp_path):
    out, [record] = run_recipe(tmp_path, extra="save_models = true")
    cell_dir = out / "cells" / record["id"]
    evaluated = torch.load(cell_dir / "logits.pt")
    saved, model = reload(cell_dir / "model")
    assert torch.equal(saved, evaluated), (saved - evaluated).abs().max()
    assert "IntxUnpackedToInt8Tensor" in {type(m.weight).__name__ for m in model.modules() if isinstance(m, torch.nn.Linear)}

    to = tmp_path / "export"
    res = cli.invoke(app, ["export", str(out), record["id"][:6], "--to", str(to)])
    assert res.exit_code == 0, res.output
    assert "rebuilding" not in res.output  # the saved model was copied
    exported, _ = reload(to)
    assert torch.equal(exported, evaluated)

    card = (to / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "toy-qwen3" and meta["library_name"] == "transformers"
    assert {"qcompare", "quantization", "torchao"} <= set(meta["tags"])
    metrics = meta["model-index"][0]["results"][0]["metrics"]
    assert {(m["type"], m["value"]) for m in metrics} == {("mean", record["metrics"]["probe/mean"]), ("mean_stderr", 0.01)}
    for text in ("`bits = 4`", "`max_steps = 2`", "| probe/mean |", "0.0100", "## Cost", "train_steps", "git_sha",
                 "```toml", 'name = "nudge"'):
        assert text in card, text
    # an occupied folder is refused unless --force
    again = cli.invoke(app, ["export", str(out), record["id"], "--to", str(to)])
    assert again.exit_code == 2 and "not empty" in again.output


def test_export_rebuilds_an_unsaved_cell_with_its_seed(toy_plugins, tmp_path):
    out, [record] = run_recipe(tmp_path)
    cell_dir = out / "cells" / record["id"]
    assert not (cell_dir / "model").exists()
    before = sorted(p.name for p in cell_dir.iterdir())
    to = tmp_path / "export"
    res = cli.invoke(app, ["export", str(out), record["id"], "--to", str(to)])
    assert res.exit_code == 0, res.output
    assert "was not saved during the run" in res.output and "seed 0" in res.output
    exported, _ = reload(to)
    assert torch.equal(exported, torch.load(cell_dir / "logits.pt"))
    assert "rebuilt after the run" in (to / "README.md").read_text()
    assert sorted(p.name for p in cell_dir.iterdir()) == before  # the stored cell is untouched


def test_a_failed_forced_export_keeps_the_earlier_export(toy_plugins, monkeypatch, tmp_path):
    out, [record] = run_recipe(tmp_path)
    to = tmp_path / "export"
    assert cli.invoke(app, ["export", str(out), record["id"], "--to", str(to)]).exit_code == 0
    before = {p.relative_to(to): p.read_bytes() for p in to.rglob("*") if p.is_file()}
    assert "model.safetensors" in {p.name for p in before}

    from qcompare.engine.pipeline import CellPipeline

    def broken(self, student):
        raise RuntimeError("out of memory\nsecond line")

    monkeypatch.setattr(CellPipeline, "distill", broken)
    res = cli.invoke(app, ["export", str(out), record["id"], "--to", str(to), "--force"])
    assert res.exit_code == 2, res.output
    [line] = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert "RuntimeError: out of memory" in line and "left as it was" in line and "second line" not in res.output
    assert {p.relative_to(to): p.read_bytes() for p in to.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp.toml", "export", "run"]  # no staging left


def test_export_best_picks_the_best_configuration_and_rejects_unknown_metrics(toy_plugins, tmp_path):
    out, records = run_recipe(tmp_path, bits="[8, 2]", extra='export_best = "probe/mean"')
    best = max(records, key=lambda r: r["metrics"]["probe/mean"])
    card = (out / "best" / "README.md").read_text()
    assert f"cell `{best['id']}`" in card
    # chosen on the metric it reports: the card says what that means
    assert "selected on probe/mean, the reported metric itself" in card and "selection bias" in card
    assert torch.equal(reload(out / "best")[0], torch.load(out / "cells" / best["id"] / "logits.pt"))

    recipe = tmp_path / "exp.toml"
    res = cli.invoke(app, ["run", str(recipe), "-o", str(out), "--set", 'export_best="toy/acc"'])
    assert res.exit_code == 2 and "unknown export_best metric 'toy/acc'; known: check/spread, probe/mean" in res.output
    res = cli.invoke(app, ["validate", str(recipe), "--set", 'export_best="accuracy please"'])
    assert res.exit_code == 2 and "export_best: bad value 'accuracy please'" in res.output


def test_export_best_selects_on_the_recipes_held_out_metric_and_says_so(toy_plugins, tmp_path):
    out, records = run_recipe(tmp_path, bits="[8, 2]",
                              extra='export_best = "probe/mean"\n[report]\nselect_on = "check/spread"')
    best = max(records, key=lambda r: r["metrics"]["check/spread"])
    card = (out / "best" / "README.md").read_text()
    assert f"cell `{best['id']}`" in card
    assert "selected on check/spread (the recipe's [report] select_on, apart from the reported metrics)" in card
    res = cli.invoke(app, ["validate", str(tmp_path / "exp.toml"), "--set", 'report.select_on="spread"'])
    assert res.exit_code == 2 and "report.select_on" in res.output


def test_export_refuses_teacher_unknown_and_ambiguous_cells(toy_plugins, tmp_path):
    out, [record] = run_recipe(tmp_path)
    res = cli.invoke(app, ["export", str(out), "zzzz", "--to", str(tmp_path / "x")])
    assert res.exit_code == 2 and "no cell id" in res.output
    (out / "cells" / (record["id"][:3] + "other")).mkdir()
    res = cli.invoke(app, ["export", str(out), record["id"][:3], "--to", str(tmp_path / "x")])
    assert res.exit_code == 2 and "matches 2 cells" in res.output


def test_tinygemm_on_cpu_is_not_saved_but_the_cell_keeps_its_results(toy_plugins, tmp_path):
    recipe_extra = "save_models = true"
    recipe = tmp_path / "exp.toml"
    recipe.write_text(RECIPE.format(bits=4, extra=recipe_extra).replace(
        "group_size = 32", 'group_size = 32\nsymmetric = false\npacking = "tinygemm"'))
    out = tmp_path / "run"
    res = cli.invoke(app, ["run", str(recipe), "-o", str(out)])
    # the model asked for is missing: the run says so and exits 1; the evaluation stands
    assert res.exit_code == 1, res.output
    assert "1 cells' models were not saved" in res.output
    [record] = [json.loads(p.read_text()) for p in out.glob("cells/*/result.json")]
    assert record["status"] == "done" and "probe/mean" in record["metrics"]
    assert "cannot save Int4OpaqueTensor" in record["save_error"] and "packing='unpacked'" in record["save_error"]
    assert not (out / "cells" / record["id"] / "model").exists()


def test_saving_a_torchao_lora_student_writes_the_base_and_a_peft_adapter_beside_it(tmp_path):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from qcompare.sdk.saving import save_converted
    from qcompare_plugins.toy import MODEL
    from qcompare_plugins.torchao_quantizer import TorchaoParams, TorchaoQuantizer

    quantizer, params = TorchaoQuantizer(), TorchaoParams(bits=4)
    student = quantizer.prepare(AutoModelForCausalLM.from_pretrained(MODEL), params, None)
    torch.manual_seed(0)  # init_lora_weights=False: random B, so a lost adapter changes the logits
    student = get_peft_model(student, LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    model = quantizer.convert(student.get_base_model(), params, None)
    with torch.no_grad():
        evaluated = model(IDS).logits
    save_converted(quantizer, model, params, tmp_path / "m", None)

    with torch.no_grad():
        assert torch.equal(model(IDS).logits, evaluated)  # the adapters went back after the save
    assert not any("lora_" in k for k in load_file(tmp_path / "m" / "model.safetensors"))  # the base alone
    adapter = load_file(tmp_path / "m" / "adapter_model.safetensors")
    assert len(adapter) == 2 * 14 and all(k.startswith("base_model.model.model.layers.") for k in adapter)
    config = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] is None and config["inference_mode"] is True
    reloaded, back = reload_model(tmp_path / "m")
    assert torch.equal(reloaded, evaluated), (reloaded - evaluated).abs().max()
    bases = [m.base_layer for m in back.modules() if hasattr(m, "lora_A")]  # peft's layers on torchao's weights
    assert len(bases) == 14 and {type(b.weight).__name__ for b in bases} == {"IntxUnpackedToInt8Tensor"}


LORA = """
[data]
train = "toy-chat"
"""


def lora_recipe(tmp_path, quantizer_lines: str, save_models: bool, grid: bool = True):
    """Run one LoRA cell (sft, lora_r = 4) and export it: copied if saved, else rebuilt. ``grid``: the
    quantizer takes the recipe's ``bits`` and ``group_size``."""
    recipe = tmp_path / "lora.toml"
    text = RECIPE.format(bits="4", extra=f"save_models = {str(save_models).lower()}\n" + LORA)
    if not grid:
        text = text.replace("bits = 4\ngroup_size = 32\n", "")
    recipe.write_text(text.replace('name = "torchao"', quantizer_lines)
                      .replace('name = "nudge"', 'name = "sft"\nlora_r = 4\nlearning_rate = 0.01\n'
                                                 'per_device_train_batch_size = 1\nmax_length = 64'))
    out = tmp_path / "run"
    res = cli.invoke(app, ["run", str(recipe), "-o", str(out)])
    assert res.exit_code == 0, res.output
    [record] = [json.loads(p.read_text()) for p in out.glob("cells/*/result.json")]
    assert record["status"] == "done" and "save_error" not in record, record.get("error") or record.get("save_error")
    to = tmp_path / "export"
    res = cli.invoke(app, ["export", str(out), record["id"], "--to", str(to)])
    assert res.exit_code == 0, res.output
    assert ("rebuilding" in res.output) is not save_models
    return to, torch.load(out / "cells" / record["id"] / "logits.pt")


def card_loads(to):
    """Run the model card's own "Use" code on the folder; return the model's logits and the model."""
    card = (to / "README.md").read_text()
    code = card.split("## Use")[1].split("```python")[1].split("```")[0]
    scope = {}
    exec(code.replace("path/to/this/folder", str(to)), scope)  # noqa: S102 - the card's code is what we test
    with torch.no_grad():
        return scope["model"](IDS).logits, scope["model"], card


def check_lora_folder(to):
    """Base and adapter files, a trained adapter, the lora tags; return what the card's code loads."""
    from safetensors.torch import load_file

    assert {"config.json", "model.safetensors", "adapter_config.json", "adapter_model.safetensors",
            "README.md"} <= {p.name for p in to.iterdir()}
    assert not any("lora_" in k for k in load_file(to / "model.safetensors"))  # the base alone
    adapter = load_file(to / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in adapter.items())  # trained (B starts at zero)
    logits, model, card = card_loads(to)
    assert {"lora", "peft"} <= set(yaml.safe_load(card.split("---")[1])["tags"])
    assert "LoRA adapter trained on it" in card and "# base + LoRA adapter" in card
    assert getattr(model, "_hf_peft_config_loaded", False)  # the adapter came with the one call
    return logits


def test_exported_lora_torchao_cell_loads_base_and_adapter_in_one_from_pretrained(toy_plugins, monkeypatch, tmp_path):
    monkeypatch.setenv("QCOMPARE_PLUGINS", "local,toy,torchao,distillers")
    to, evaluated = lora_recipe(tmp_path, 'name = "torchao"', save_models=True)
    exported = check_lora_folder(to)
    assert torch.equal(exported, evaluated), (exported - evaluated).abs().max()  # fp32 on CPU: exact


def test_exported_lora_gptq_cell_is_the_compressed_base_plus_a_peft_adapter(toy_plugins, monkeypatch, tmp_path):
    monkeypatch.setenv("QCOMPARE_PLUGINS", "local,toy,torchao,distillers,llmcompressor")
    gptq = 'name = "gptq"\ncalibration_samples = 8\ncalibration_length = 64'
    to, evaluated = lora_recipe(tmp_path, gptq, save_models=False)
    config = json.loads((to / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    exported = check_lora_folder(to)
    # compressed-tensors dequantizes to float weights on load (measured: exact; 1e-5 as for full fine-tuning)
    assert torch.allclose(exported, evaluated, atol=1e-5), (exported - evaluated).abs().max()


def test_exported_gptq_cell_is_a_compressed_tensors_checkpoint_with_the_evaluated_logits(toy_plugins, monkeypatch, tmp_path):
    monkeypatch.setenv("QCOMPARE_PLUGINS", "local,toy,torchao,llmcompressor")
    recipe = tmp_path / "gptq.toml"
    recipe.write_text(RECIPE.format(bits="4", extra='[data]\ntrain = "toy-chat"\n')
                      .replace('name = "torchao"', 'name = "gptq"\ncalibration_samples = 16\ncalibration_length = 64'))
    out = tmp_path / "run"
    res = cli.invoke(app, ["run", str(recipe), "-o", str(out)])
    assert res.exit_code == 0, res.output
    [record] = [json.loads(p.read_text()) for p in out.glob("cells/*/result.json")]
    to = tmp_path / "export"
    res = cli.invoke(app, ["export", str(out), record["id"], "--to", str(to)])
    assert res.exit_code == 0, res.output
    config = json.loads((to / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    exported, _ = reload(to)
    evaluated = torch.load(out / "cells" / record["id"] / "logits.pt")
    assert torch.allclose(exported, evaluated, atol=1e-5), (exported - evaluated).abs().max()


def test_a_plugins_own_format_is_saved_as_itself_and_every_load_goes_through_the_plugin(toy_plugins, monkeypatch,
                                                                                          tmp_path):
    import qcompare_nf3  # the example plugin: a packed format transformers does not know

    monkeypatch.setenv("QCOMPARE_PLUGINS", "local,toy,torchao,distillers")
    add_plugin(qcompare_nf3)
    try:  # a LoRA cell: the adapter goes back on the plugin's packed layers too
        to, evaluated = lora_recipe(tmp_path, 'name = "nf3"', save_models=True, grid=False)
    finally:
        remove_plugin(qcompare_nf3)
    own = json.loads((to / "qcompare_format.json").read_text())
    assert (own["quantizer"], own["params"], own["module"]) == ("nf3", {"group_size": 64, "skip": ["lm_head"]},
                                                                "qcompare_nf3")
    assert all(f.stat().st_mode & 0o044 == 0o044 for f in to.iterdir())  # readable by all, as a shared model is
    exported, model, card = card_loads(to)  # the card's code: qcompare.load_pretrained, not transformers
    assert torch.equal(exported, evaluated), (exported - evaluated).abs().max()
    assert {type(m.base_layer).__name__ for m in model.modules() if hasattr(m, "lora_A")} == {"NF3Linear"}
    code = card.split("## Use")[1].split("```python")[1]
    assert "qcompare.load_pretrained(" in code and "AutoModelForCausalLM" not in code
    assert "own format of the quantizer `nf3`" in card and "puts it back on the base" in card
    on_disk = card.split("## On disk")[1].split("##")[0]
    assert "the quantizer `nf3`'s own format" in on_disk and "(1.00× the true size above)" in on_disk
    # a later recipe naming the folder as its model loads it through the plugin too (not as random weights)
    from qcompare.engine.inputs import load_model
    from qcompare.sdk.registry import get_registry

    again, _ = load_model(str(to), get_registry(), "cpu")
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, evaluated)


def test_a_folder_whose_plugin_is_not_installed_names_the_package_to_install(tmp_path):
    import qcompare
    from qcompare.errors import QcompareError

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "qcompare_format.json").write_text(json.dumps(
        {"quantizer": "nf9", "params": {}, "package": "qcompare-nf9", "version": "1.2.0", "entry_point": "nf9",
         "module": "qcompare_nf9"}))
    with pytest.raises(QcompareError, match=r"own format of the quantizer 'nf9' \(qcompare-nf9 1\.2\.0, entry point "
                                            r"'nf9'\), which is not installed here: pip install qcompare-nf9"):
        qcompare.load_pretrained(tmp_path)
