"""Results that say where they came from and what they cost: plugin versions that invalidate,
logical cost that does not depend on which cell ran first, fp32 master weights, old records."""

from __future__ import annotations

import json
from pathlib import Path
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from conftest import BASIC
from qcompare.cli import app

pytestmark = pytest.mark.e2e  # runs whole cells, runs or commands (not in the fast subset)

cli = CliRunner()


# --- provenance that invalidates ---------------------------------------------------------------

PLUGIN = '''
from qcompare import hookimpl
from qcompare.sdk.api import Distiller, DistillResult


class Touch(Distiller):
    """Test distiller: one gradient step, then the student's lm_head scaled by FACTOR (a plugin someone
    keeps fixing)."""

    name = "touch"

    def distill(self, student, params, context):
        teacher = context.teacher
        import torch
        ids = torch.randint(3, teacher.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
        student(ids).logits.float().pow(2).mean().backward()
        with torch.no_grad():
            for p in student.parameters():
                if p.grad is not None:
                    p.sub_(1e-3 * p.grad)
                    p.grad = None
            student.lm_head.weight.mul_(FACTOR)
        return DistillResult(student)


FACTOR = {factor}


@hookimpl
def register_distillers(register):
    register(Touch)
'''


@pytest.fixture
def touch_plugin(tmp_path, monkeypatch, test_plugins):
    """A plugin module in a folder of its own (no distribution: identified by its source)."""
    import importlib
    import sys

    from qcompare.sdk import add_plugin, clear_all, remove_plugin

    folder = tmp_path / "touchplugin"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))

    def install(factor):
        (folder / "touch_plugin.py").write_text(PLUGIN.format(factor=factor))
        clear_all()  # as a fresh process would: the plugin's source is hashed anew
        if "touch_plugin" in sys.modules:
            remove_plugin(sys.modules["touch_plugin"])
            del sys.modules["touch_plugin"]
        importlib.invalidate_caches()
        module = importlib.import_module("touch_plugin")
        add_plugin(module)
        return module

    yield install
    if "touch_plugin" in sys.modules:
        remove_plugin(sys.modules.pop("touch_plugin"))


def test_a_fixed_plugin_makes_its_cells_stale_and_the_report_never_pools_them(touch_plugin, write_recipe, tmp_path):
    recipe = write_recipe(BASIC.replace('name = "keep"', 'name = "touch"').replace("seeds = [0, 1]", "seeds = [0]"))
    out = tmp_path / "run"
    touch_plugin(1.5)
    assert cli.invoke(app, ["run", str(recipe), "-o", str(out)]).exit_code == 0
    record = next(json.loads(p.read_text()) for p in out.glob("cells/*/result.json")
                  if (json.loads(p.read_text())["settings"]["distiller"] or {}).get("name") == "touch")
    assert record["plugins"]["distiller:touch"]["source"] and record["plugins"]["quantizer:rtn"]

    touch_plugin(1.0)  # the fix
    res = cli.invoke(app, ["plan", str(recipe), "-o", str(out)])
    assert res.exit_code == 0 and res.output.count("stale") >= 2 and "2 cells are stale" in res.output
    res = cli.invoke(app, ["run", str(recipe), "-o", str(out), "--keep-stale"])
    assert res.exit_code == 0 and "kept as they are" in res.output
    # the report does not pool the kept stale cells with fresh ones of the same configuration
    res = cli.invoke(app, ["run", str(recipe), "-o", str(out), "--set", "seeds=[0,1]", "--keep-stale"])
    assert res.exit_code == 0, res.output
    report = cli.invoke(app, ["report", str(out), "--format", "csv"]).output
    touch_rows = [line for line in report.splitlines() if "touch" in line]
    assert len(touch_rows) == 4 and sum("plugins" in line for line in touch_rows) == 4  # 2 bits x 2 versions
    res = cli.invoke(app, ["run", str(recipe), "-o", str(out), "--set", "seeds=[0,1]"])
    assert res.exit_code == 0 and "running them again" in res.output
    plan = cli.invoke(app, ["plan", str(recipe), "-o", str(out), "--set", "seeds=[0,1]"]).output
    assert "stale" not in plan


def test_a_rebuilt_local_model_makes_its_cells_stale(test_plugins, tiny_model_dir, tmp_path):
    """Same name, other weights (a rebuilt toy teacher, a re-exported checkpoint): the finished
    cells were made by another model, so the run does them again instead of mixing the two."""
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(BASIC.replace("{model}", str(model)).replace("seeds = [0, 1]", "seeds = [0]"))
    out = tmp_path / "run"
    assert cli.invoke(app, ["run", str(recipe), "-o", str(out)]).exit_code == 0
    record = json.loads(next(out.glob("cells/*/result.json")).read_text())
    assert record["plugins"][f"model:{model}"]["sha256"]
    assert "stale" not in cli.invoke(app, ["plan", str(recipe), "-o", str(out)]).output

    weights = load_file(model / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] * 1.01
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    res = cli.invoke(app, ["plan", str(recipe), "-o", str(out)])
    cells = len(list(out.glob("cells/*/result.json")))
    assert res.exit_code == 0 and f"{cells} cells are stale" in res.output, res.output
    res = cli.invoke(app, ["run", str(recipe), "-o", str(out)])
    assert res.exit_code == 0 and "running them again" in res.output
    assert "stale" not in cli.invoke(app, ["plan", str(recipe), "-o", str(out)]).output


def test_the_data_files_a_cell_reads_by_name_count_in_its_identity(tmp_path):
    """The toy world's files are rebuilt under the same names, and an evaluator's local file can be
    rewritten in place: a cell's identity holds every file it reads by name (registered training
    data, an evaluator's texts, lm-eval's task folders), so such a rebuild makes its cells stale
    instead of mixing old and new results."""
    from qcompare.engine.cells import expand
    from qcompare.sdk.registry import get_registry
    from qcompare.engine.recipe import load_recipe
    from qcompare.engine.runner import plugin_identities

    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"text": "bado drinks tea ."}\n')
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(textwrap.dedent(f"""
        name = "identity"
        models = ["toy-qwen3"]
        [data]
        train = "toy-chat"
        [[quantizers]]
        name = "torchao"
        bits = 8
        [[distillers]]
        name = "none"
        [[evaluators]]
        name = "lm_eval"
        tasks = ["toy"]
        [[evaluators]]
        name = "perplexity"
        dataset = "{texts}"
        [[evaluators]]
        name = "kl_to_teacher"
        dataset = "toy-heldout"
    """))
    registry = get_registry()
    teacher, cell = expand(load_recipe(recipe))
    keys = plugin_identities(cell, registry)
    assert {"data:toy-chat", "data:toy-heldout", f"data:{texts}", "tasks:toy/tasks", "model:toy-qwen3"} <= set(keys)
    assert keys["data:toy-heldout"]["files"] == 1 and keys["tasks:toy/tasks"]["files"] > 10
    assert "data:toy-chat" not in plugin_identities(teacher, registry)  # the teacher row trains on nothing

    texts.write_text('{"text": "bado drinks milk ."}\n')
    assert plugin_identities(cell, registry)[f"data:{texts}"] != keys[f"data:{texts}"]


# --- logical cost --------------------------------------------------------------------------------


def test_cached_teacher_work_counts_in_every_cell_and_the_saving_is_the_runs(tmp_path):
    from qcompare.engine.recipe import load_recipe
    from qcompare.reports.tables import print_report
    from qcompare.engine.runner import Runner
    from qcompare.results.store import RunStore
    from qcompare_plugins.distillers.teacher_cache import clear_memory
    from rich.console import Console

    clear_memory()
    recipe = tmp_path / "sweep.toml"
    recipe.write_text(textwrap.dedent("""
        name = "sweep"
        models = ["toy-qwen3"]
        device = "cpu"
        teacher = false
        [data]
        train = "toy-chat"
        subset = 32
        [[quantizers]]
        name = "torchao"
        bits = 4
        group_size = 32
        [[distillers]]
        name = "gkd"
        lmbda = 0.0
        learning_rate = [1e-4, 1e-3]
        max_steps = 3
        per_device_train_batch_size = 4
        max_length = 64
        save_steps = 0
    """))
    records = Runner(load_recipe(recipe), RunStore(tmp_path / "run")).run()
    first, second = sorted((r.cost for r in records), key=lambda c: -c["teacher_forwards"])
    assert second["teacher_forwards"] == 0 and second["teacher_cached_tokens"] == first["teacher_tokens"]
    # the method's work is the same whichever cell ran first; what the run spent is not
    for key in ("flops", "teacher_tokens_logical", "teacher_forwards_logical"):
        assert first[key] == second[key], key
    assert second["flops_spent"] < second["flops"] == first["flops_spent"]
    console = Console(width=250, record=True)
    print_report(tmp_path / "run", console, "table")
    text = console.export_text()
    assert "teacher cache served" in text and "over the whole run" in text and "logical cost" in text


# --- fp32 master weights ---------------------------------------------------------------------------


def test_full_fine_tuning_of_a_bf16_student_keeps_updates_bf16_would_round_away(tmp_path):
    from qcompare.testing import tiny_chat, tiny_context, tiny_teacher, tiny_tokenizer

    from qcompare_plugins.distillers.cost import CostMeter
    from qcompare_plugins.distillers.sft import SFTDistiller, SFTParams

    tokenizer, data = tiny_tokenizer(), tiny_chat()
    teacher = tiny_teacher().to(torch.bfloat16)

    def student():
        s = tiny_teacher().to(torch.bfloat16)
        with torch.no_grad():  # weights of magnitude 1: a bf16 ulp is 2^-7, half of it 0.0039
            s.lm_head.weight.copy_(torch.sign(s.lm_head.weight) + (s.lm_head.weight == 0))
        return s.train()

    params = SFTParams(learning_rate=1e-3, max_steps=12, per_device_train_batch_size=4, max_length=32,
                       lr_scheduler_type="constant", save_steps=0)
    # plain bf16 training: each AdamW step (~1e-3) is below half an ulp and rounds away
    plain = student()
    before = plain.lm_head.weight.detach().clone()
    trainer = SFTDistiller().make_trainer(plain, tokenizer, __import__(
        "qcompare_plugins.distillers.sft_trainer", fromlist=["x"]).to_prompt_completion(data), params,
        tiny_context(tmp_path / "plain"), CostMeter("cpu"))
    trainer.train()
    assert torch.equal(plain.lm_head.weight, before)
    # the distiller: fp32 master weights, the steps add up, the student is bf16 again after
    ours = student()
    result = SFTDistiller().distill(ours, params, tiny_context(tmp_path / "ours", teacher=teacher, tokenizer=tokenizer, data=data))
    assert result.cost["master_weights"] == "fp32"
    assert ours.lm_head.weight.dtype == torch.bfloat16
    moved = (ours.lm_head.weight != before).float().mean().item()
    assert moved > 0.5, moved
    # LoRA keeps its fp32 adapters on a frozen base: nothing is cast
    lora = student()
    result = SFTDistiller().distill(lora, params.model_copy(update={"lora_r": 4}), tiny_context(tmp_path / "lora", teacher=teacher, tokenizer=tokenizer, data=data))
    assert result.cost["master_weights"] == "as the model"
    assert {p.dtype for n, p in lora.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    assert {p.dtype for n, p in lora.named_parameters() if "lora_" in n} == {torch.float32}


# --- old run folders ---------------------------------------------------------------------------------


def test_a_first_build_run_folder_still_reads_and_a_newer_one_says_so(tmp_path):
    from qcompare.results.frame import load_run

    cell = tmp_path / "run" / "cells" / "0123456789ab"
    cell.mkdir(parents=True)
    v1 = {"id": "0123456789ab", "label": "m · torchao(bits=4) · none", "status": "done",
          "settings": {"model": "m", "quantizer": {"name": "torchao", "params": {"bits": 4}},
                       "distiller": {"name": "none", "params": {}}, "seed": None, "data": {}, "evaluators": []},
          "metrics": {"t/acc": 0.5}, "stderr": {"t/acc": 0.01},
          "size": {"bits_per_weight": 4.5, "storage_bytes": 1000}, "cost": {"total_seconds": 1.0}}
    (cell / "result.json").write_text(json.dumps(v1))
    df = load_run(tmp_path / "run")
    assert df.loc[0, "nominal_bits"] == 4.5 and df.loc[0, "memory_bytes"] == 1000 and df.loc[0, "t/acc"] == 0.5
    assert cli.invoke(app, ["report", str(tmp_path / "run")]).exit_code == 0
    (cell / "result.json").write_text(json.dumps({**v1, "schema_version": 99}))
    res = cli.invoke(app, ["report", str(tmp_path / "run")])
    assert res.exit_code == 2 and "written by a newer qcompare (record schema 99" in res.output
