"""The built-in distillers (none, sft, gkd) on a tiny Qwen3 with a torchao fake-quant student."""

from __future__ import annotations

import copy
import math
import os
from dataclasses import replace

import pytest
import torch
from pydantic import ValidationError

from qcompare.errors import QcompareError
from qcompare.sdk.api import CellProgress
from qcompare.sdk.registry import get_registry
from qcompare.testing import tiny_chat, tiny_context, tiny_student, tiny_teacher, tiny_tokenizer
from qcompare_plugins.distillers import GKDDistiller, NoDistiller, SFTDistiller
from qcompare_plugins.distillers.common import TrainingDivergedError
from qcompare_plugins.distillers.cost import SAVED_NAME as COST_FILE, CostMeter
from qcompare_plugins.distillers.gkd import GKDParams
from qcompare_plugins.distillers.sft import SFTParams

TINY = dict(max_steps=4, max_length=64, learning_rate=1e-3, per_device_train_batch_size=2)


@pytest.fixture(scope="module")
def world():
    tokenizer = tiny_tokenizer()
    return tokenizer, tiny_teacher(), tiny_chat()


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(before, model):
    after = model.state_dict()
    return [k for k, v in before.items() if k in after and not torch.equal(v, after[k])]


class Bar:
    """A CellProgress backend that records what the distiller reported."""

    def __init__(self, stop_at=None):
        self.total, self.done, self.stop_at, self.calls = None, 0, stop_at, []

    def start(self, description, total):
        self.total = total

        def advance(n=1):
            if self.stop_at is not None and self.done + n >= self.stop_at:
                raise KeyboardInterrupt(f"simulated interruption at step {self.done + n}")
            self.done += n
            self.calls.append(n)

        return advance, lambda: None


def test_distillers_register_through_the_entry_point():
    registry = get_registry()
    assert {"none", "sft", "gkd"} <= set(registry.names("distiller"))
    assert registry.get("distiller", "gkd") is GKDDistiller
    assert NoDistiller.seeded is False and GKDDistiller.seeded and SFTDistiller.seeded


@pytest.mark.parametrize("cls", [SFTDistiller, GKDDistiller])
def test_every_parameter_has_a_default_and_a_description(cls):
    for name, field in cls.Params.model_fields.items():
        assert not field.is_required(), name
        assert field.description, name
    cls.Params()  # all defaults together are valid


@pytest.mark.parametrize(
    "bad", [{"lmbda": 1.5}, {"beta": -0.1}, {"temperature": 0}, {"learning_rate": 0}, {"max_new_tokens": 0},
            {"warmup_ratio": 0.1, "warmup_steps": 3}, {"lr_scheduler_type": "cosine_typo"}, {"lamda": 0.5}],
)
def test_gkd_params_reject_bad_values(bad):
    with pytest.raises(ValidationError):
        GKDParams(**bad)


def test_none_returns_the_student_untouched(world, tmp_path):
    tokenizer, teacher, data = world
    student = tiny_student(teacher)
    result = NoDistiller().distill(student, NoDistiller.Params(), tiny_context(tmp_path, teacher=teacher, tokenizer=tokenizer, data=data))
    assert result.student is student and result.log == []
    assert result.cost["train_seconds"] == 0 and result.cost["steps"] == 0


@pytest.mark.parametrize("cls", [SFTDistiller, GKDDistiller])
def test_missing_data_asks_for_the_recipe_field(world, tmp_path, cls):
    tokenizer, teacher, _ = world
    with pytest.raises(QcompareError, match=r"\[data\] train"):
        cls().distill(tiny_student(teacher, False), cls.Params(), tiny_context(tmp_path, teacher=teacher, tokenizer=tokenizer, data=None))


def test_bad_data_names_what_was_found(world, tmp_path):
    tokenizer, teacher, data = world
    student = tiny_student(teacher, False)
    wrong = data.rename_column("messages", "conversation")
    with pytest.raises(QcompareError, match=r"'messages' column.*found columns: \['conversation'\]"):
        GKDDistiller().distill(student, GKDParams(), tiny_context(tmp_path, teacher=teacher, tokenizer=tokenizer, data=wrong))
    no_answer = data.map(lambda row: {"messages": row["messages"][:1]})
    with pytest.raises(QcompareError, match="row 0"):
        SFTDistiller().distill(student, SFTParams(), tiny_context(tmp_path, teacher=teacher, tokenizer=tokenizer, data=no_answer))


def test_sft_trains_the_student_on_the_answers(world, tmp_path):
    tokenizer, teacher, data = world
    student, teacher_before = tiny_student(teacher), weights(teacher)
    before, bar = weights(student), Bar()
    context = tiny_context(tmp_path, progress=CellProgress(bar.start))
    result = SFTDistiller().distill(student, SFTParams(**TINY, save_steps=2), replace(context, teacher=teacher, tokenizer=tokenizer, data=data))
    assert [e["step"] for e in result.log] == [1, 2, 3, 4]
    assert all(math.isfinite(e["loss"]) for e in result.log)
    assert result.log[-1]["loss"] < result.log[0]["loss"]
    assert changed(before, result.student) and not changed(teacher_before, teacher)
    assert (bar.total, bar.done) == (4, 4)
    cost = result.cost
    assert cost["steps"] == 4 and cost["student_tokens"] > 0 and cost["teacher_tokens"] == 0
    assert cost["rollout_seconds"] == 0 and cost["flops"] == 6 * cost["student_params"] * cost["student_tokens"]
    assert not context.checkpoint_dir.exists()  # deleted once the cell finished


def test_sft_loss_covers_only_the_answer(world, tmp_path):
    from qcompare_plugins.distillers.common import check_data
    from qcompare_plugins.distillers.cost import CostMeter
    from qcompare_plugins.distillers.sft_trainer import to_prompt_completion

    tokenizer, teacher, data = world
    rows = to_prompt_completion(check_data(data, "sft"))
    trainer = SFTDistiller().make_trainer(tiny_student(teacher, False), tokenizer, rows, SFTParams(**TINY), tiny_context(tmp_path), CostMeter("cpu"))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        trained_on = tokenizer.decode(ids[labels != -100]).split()
        assert trained_on[-1] == "<|end|>" and trained_on[0] in ("it", "maybe") and "plus" not in trained_on


def test_lora_student_keeps_its_adapters_and_converts_to_the_same_function(world, tmp_path):
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.qat import QATConfig

    tokenizer, teacher, data = world
    untrained = tiny_student(teacher)
    student = tiny_student(teacher)
    result = SFTDistiller().distill(student, SFTParams(**TINY, lora_r=4), tiny_context(tmp_path, teacher=teacher, tokenizer=tokenizer, data=data))
    trained = result.student
    assert type(trained) is type(untrained) and any("lora_A" in name for name, _ in trained.named_modules())
    converted = copy.deepcopy(trained)
    quantize_(converted, QATConfig(IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)), step="convert"))
    ids = tokenizer("<|user|> what is 3 plus 4 <|end|> <|assistant|> it is 7", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = trained(ids).logits
        assert not torch.allclose(logits, untrained.eval()(ids).logits, atol=1e-3)  # the adapters trained
        # converting quantizes the base layers only: the trained function survives
        assert torch.allclose(logits, converted(ids).logits, atol=1e-5)


@pytest.mark.e2e
def test_gkd_off_and_on_policy_split_their_cost(world, tmp_path):
    tokenizer, teacher, data = world
    costs = {}
    for lmbda in (0.0, 1.0):
        params = GKDParams(**TINY, lmbda=lmbda, max_new_tokens=8)
        result = GKDDistiller().distill(tiny_student(teacher), params, tiny_context(tmp_path / str(lmbda), teacher=teacher, tokenizer=tokenizer, data=data))
        assert len(result.log) == 4 and all(e["on_policy"] == lmbda for e in result.log)
        costs[lmbda] = result.cost
    off, on = costs[0.0], costs[1.0]
    assert off["rollout_seconds"] == 0 and off["tokens_generated"] == 0
    assert on["rollout_seconds"] > 0 and 0 < on["tokens_generated"] <= 4 * 2 * 8
    for cost in (off, on):
        assert cost["teacher_forward_seconds"] > 0 and cost["student_forward_backward_seconds"] > 0
        assert cost["teacher_tokens"] == cost["student_tokens"] > 0
        assert cost["train_peak_memory_bytes"] > 0 and cost["steps_per_second"] > 0


def test_gkd_seq_kd_trains_on_teacher_rollouts(world, tmp_path):
    tokenizer, teacher, data = world
    params = GKDParams(**TINY, lmbda=0.0, seq_kd=True, max_new_tokens=8)
    result = GKDDistiller().distill(tiny_student(teacher), params, tiny_context(tmp_path, teacher=teacher, tokenizer=tokenizer, data=data))
    assert all(e["teacher_rollout"] == 1.0 and e["on_policy"] == 0.0 for e in result.log)
    cost = result.cost
    assert cost["rollout_seconds"] > 0 and cost["tokens_generated"] > 0
    # rollouts by the teacher count 2·teacher_params per token, trained tokens 6·student_params
    n = cost["student_params"]
    assert cost["flops"] == cost["flops_spent"] == 6 * n * cost["student_tokens"] + 2 * n * cost["teacher_tokens"] + 2 * n * cost["rollout_tokens"]


def _gkd_losses(world, tmp_path, seed, **extra):
    tokenizer, teacher, data = world
    params = GKDParams(**{**TINY, "lmbda": 0.5, "max_new_tokens": 8, **extra})
    result = GKDDistiller().distill(tiny_student(teacher), params, tiny_context(tmp_path, seed=seed, teacher=teacher, tokenizer=tokenizer, data=data))
    return [(e["step"], e["loss"], e["on_policy"]) for e in result.log]


@pytest.mark.e2e
def test_gkd_same_seed_gives_the_same_loss_curve(world, tmp_path):
    first = _gkd_losses(world, tmp_path / "a", seed=1)
    assert _gkd_losses(world, tmp_path / "b", seed=1) == first
    assert _gkd_losses(world, tmp_path / "c", seed=2) != first


@pytest.mark.e2e
def test_gkd_resumes_an_interrupted_cell_from_its_checkpoint(world, tmp_path):
    tokenizer, teacher, data = world
    params = GKDParams(**{**TINY, "max_steps": 6, "lmbda": 0.5, "max_new_tokens": 8, "save_steps": 2})
    whole = GKDDistiller().distill(tiny_student(teacher), params, tiny_context(tmp_path / "whole", teacher=teacher, tokenizer=tokenizer, data=data))

    cell = tmp_path / "cell"
    bar = Bar(stop_at=5)  # dies after step 5's work, before its checkpoint; the last one is step 4
    with pytest.raises(KeyboardInterrupt):
        GKDDistiller().distill(tiny_student(teacher), params, tiny_context(cell, progress=CellProgress(bar.start), teacher=teacher, tokenizer=tokenizer, data=data))
    assert [p.name for p in (cell / "checkpoints").iterdir() if p.name.startswith("checkpoint-")] == ["checkpoint-4"]

    bar = Bar()
    resumed = GKDDistiller().distill(tiny_student(teacher), params, tiny_context(cell, progress=CellProgress(bar.start), teacher=teacher, tokenizer=tokenizer, data=data))
    assert bar.calls == [4, 1, 1]  # the bar starts at the checkpoint; the rerun trains 2 steps
    assert [e["step"] for e in resumed.log] == list(range(1, 7))
    for a, b in zip(whole.log, resumed.log):
        assert a["on_policy"] == b["on_policy"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
    assert resumed.cost["steps"] == 6  # cost so far came back with the checkpoint
    assert resumed.cost["resumed_from_step"] == 4 and "resumed_from_step" not in whole.cost
    assert not (cell / "checkpoints").exists()


def test_a_crash_while_saving_the_cost_keeps_the_previous_file(tmp_path, monkeypatch):
    meter = CostMeter("cpu")
    meter.add("steps", 2)
    meter.save(tmp_path)
    meter.add("steps", 2)

    def crash(fd):  # the process dies after writing, before the data is on disk
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="simulated crash"):
        meter.save(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [COST_FILE]  # no temporary file left either
    again = CostMeter("cpu")
    again.load(tmp_path)
    assert again.totals["steps"] == 2


@pytest.mark.e2e
def test_an_unreadable_cost_file_restarts_the_count_instead_of_failing_the_resume(world, tmp_path):
    tokenizer, teacher, data = world
    params = SFTParams(**{**TINY, "save_steps": 2})
    cell = tmp_path / "cell"
    with pytest.raises(KeyboardInterrupt):
        SFTDistiller().distill(tiny_student(teacher, False), params, tiny_context(cell, progress=CellProgress(Bar(stop_at=3).start), teacher=teacher, tokenizer=tokenizer, data=data))
    saved = cell / "checkpoints" / "checkpoint-2" / COST_FILE
    saved.write_text(saved.read_text()[:20])  # truncated mid-write by an older version
    with pytest.warns(UserWarning, match="unreadable .*counts from zero"):
        resumed = SFTDistiller().distill(tiny_student(teacher, False), params, tiny_context(cell, teacher=teacher, tokenizer=tokenizer, data=data))
    assert [e["step"] for e in resumed.log][-1] == 4
    assert resumed.cost["steps"] == 2  # the two steps trained after the resume


def test_a_nan_loss_fails_the_cell_naming_the_step(world, tmp_path):
    tokenizer, teacher, data = world
    student = tiny_student(teacher, fake_quant=False)
    with torch.no_grad():
        student.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(TrainingDivergedError, match="loss is nan at step 1"):
        GKDDistiller().distill(student, GKDParams(**TINY, lmbda=0.0), tiny_context(tmp_path, teacher=teacher, tokenizer=tokenizer, data=data))


@pytest.mark.e2e
def test_tensorboard_events_outlive_the_deleted_checkpoints(world, tmp_path):
    tokenizer, teacher, data = world
    context = tiny_context(tmp_path, report_to=["tensorboard"])
    SFTDistiller().distill(tiny_student(teacher, False), SFTParams(**TINY, save_steps=2), replace(context, teacher=teacher, tokenizer=tokenizer, data=data))
    assert list((tmp_path / "tensorboard").glob("**/events.out.tfevents.*"))
    assert not context.checkpoint_dir.exists()


@pytest.mark.e2e
def test_gkd_static_rollouts_train_exactly_as_the_training_student_generates(world, tmp_path):
    # λ = 1 with sampling: every batch is the student's own rollout, from its static-shape copy or
    # from the training student; in fp32 the samples, and so the whole loss curve, are the same
    static = _gkd_losses(world, tmp_path / "static", seed=3, lmbda=1.0, rollouts="static")
    assert static == _gkd_losses(world, tmp_path / "dynamic", seed=3, lmbda=1.0, rollouts="dynamic")
    assert all(on == 1.0 for _, _, on in static)


@pytest.mark.e2e
def test_gkd_cost_says_which_rollouts_and_loss_a_cell_used(world, tmp_path):
    tokenizer, teacher, data = world
    params = GKDParams(**TINY, lmbda=1.0, max_new_tokens=4, rollouts="static")
    cost = GKDDistiller().distill(tiny_student(teacher), params, tiny_context(tmp_path, teacher=teacher, tokenizer=tokenizer, data=data)).cost
    assert cost["rollouts"].startswith("static: static KV cache") and cost["rollout_compiles"] >= 1
    assert cost["loss"].startswith("full: the student's output head is a FakeQuantizedLinear")
    auto = GKDDistiller().distill(tiny_student(teacher, skip_head=True), params.model_copy(update={"rollouts": "auto"}), tiny_context(tmp_path / "auto", teacher=teacher, tokenizer=tokenizer, data=data)).cost
    assert auto["rollouts"].startswith("dynamic: rollouts = 'auto' on CPU") and "rollout_compiles" not in auto
    assert auto["loss"].startswith("full: loss_kernel = 'auto' on CPU")


@pytest.mark.e2e
def test_the_8bit_optimizer_trains_with_torchao_and_an_added_parameter_keeps_earlier_cell_ids(world, tmp_path):
    from qcompare.engine.recipe import PluginChoice, added_defaults, runtime_keys

    def choice(**params):
        resolved = SFTParams(**params)
        return PluginChoice(name="sft", params=resolved.model_dump(mode="json"), runtime_keys=runtime_keys(SFTParams),
                            added_defaults=added_defaults(SFTParams))

    # a cell stored before the optimizer could be chosen hashed no "optimizer": at its default it still does not
    assert "optimizer" not in choice().settings()["params"]
    assert choice(optimizer="adamw_8bit").settings()["params"]["optimizer"] == "adamw_8bit"

    tokenizer, teacher, data = world
    student = tiny_student(teacher)
    before = weights(student)
    params = SFTParams(**{**TINY, "max_steps": 2}, optimizer="adamw_8bit")
    trainer = SFTDistiller().make_trainer(student, tokenizer, data.map(
        lambda row: {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]}, remove_columns=["messages"]),
        params, tiny_context(tmp_path), CostMeter("cpu"))
    trainer.train()
    assert type(trainer.optimizer.optimizer).__name__ == "AdamW8bit"
    assert changed(before, trainer.model)  # it trained


@pytest.mark.e2e
def test_compiled_rounding_trains_exactly_as_eager_rounding(world, tmp_path):
    # the weight fake quantizers compiled (torch.compile, one fused kernel): the same rounded weights
    # and straight-through gradients, so the same loss curve bit for bit
    eager = _gkd_losses(world, tmp_path / "eager", seed=4, lmbda=0.0, max_steps=3)
    compiled = _gkd_losses(world, tmp_path / "compiled", seed=4, lmbda=0.0, max_steps=3, compile_rounding=True)
    assert compiled == eager
