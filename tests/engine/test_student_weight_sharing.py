"""The runner builds a LoRA student over the teacher's memory (one copy of the weights) only
when neither the quantizer nor the distiller writes into the weights, and the teacher it
keeps for the next cell comes out bit-identical."""

from __future__ import annotations

import pytest
import torch

from types import SimpleNamespace

from qcompare.engine.pipeline import weight_sharing_copy
from qcompare.engine.recipe import load_recipe
from qcompare.engine.runner import Runner
from qcompare.results.store import RunStore

pytestmark = pytest.mark.e2e  # runs whole cells, runs or commands (not in the fast subset)

RECIPE = """
name = "share"
models = ["toy-qwen3"]
device = "cpu"
teacher = false
[data]
train = "toy-chat"
subset = 16
[[quantizers]]
name = "{quantizer}"
{qparams}
[[distillers]]
name = "{distiller}"
{dparams}
"""
TRAIN = "max_steps = 3\nper_device_train_batch_size = 2\nmax_length = 64\nsave_steps = 0\nlearning_rate = 1e-2\n"
LORA_GKD = TRAIN + "lmbda = 0.5\nmax_new_tokens = 8\nlora_r = 4\nteacher_cache = false\n"
IDS = torch.randint(3, 400, (2, 12), generator=torch.Generator().manual_seed(7))


def pipeline_and_cell(tmp_path, quantizer="torchao", qparams="bits = 4\ngroup_size = 32", distiller="gkd",
                    dparams=LORA_GKD):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "share.toml"
    path.write_text(RECIPE.format(quantizer=quantizer, qparams=qparams, distiller=distiller, dparams=dparams))
    recipe = load_recipe(path)
    store = RunStore(tmp_path / "run")
    store.init(recipe.text)
    runner = Runner(recipe, store)
    [(cell, _)] = runner.plan()
    pipeline = runner.pipeline(cell, store.cell_dir(cell.id))
    return pipeline, cell, pipeline.context


def converted_model(pipeline):
    """prepare → distill → convert, as a cell runs them."""
    model, log = pipeline.build()
    return SimpleNamespace(model=model, log=log, cost=pipeline.cost)


def snapshot(teacher):
    with torch.no_grad():
        logits = teacher(IDS).logits
    grads = [p.requires_grad for p in teacher.parameters()]
    return {k: v.clone() for k, v in teacher.state_dict().items()}, grads, logits


def assert_intact(teacher, before):
    state, grads, logits = before
    now = teacher.state_dict()
    changed = [k for k, v in state.items() if not torch.equal(v, now[k]) or v.dtype != now[k].dtype]
    assert not changed, changed
    assert [p.requires_grad for p in teacher.parameters()] == grads
    with torch.no_grad():
        assert torch.equal(teacher(IDS).logits, logits)


def record_fake_quant_logits(monkeypatch, quantizer_cls, seen):
    """Keep the trained student's (fake-quant) logits just before convert."""
    convert = quantizer_cls.convert

    def spy(self, student, params, context):
        with torch.no_grad():
            seen["student"] = student.eval()(IDS).logits
        seen["teacher_ptrs"] = {p.data_ptr() for p in context.teacher.parameters()}
        seen["shared_during_training"] = sum(p.data_ptr() in seen["teacher_ptrs"] for p in student.parameters())
        return convert(self, student, params, context)

    monkeypatch.setattr(quantizer_cls, "convert", spy)


def test_weight_sharing_copy_shares_memory_but_not_parameter_objects():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    teacher = Qwen3ForCausalLM(Qwen3Config(vocab_size=428, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                           tie_word_embeddings=True))
    copy = weight_sharing_copy(teacher)
    pairs = list(zip(teacher.parameters(), copy.parameters()))
    assert all(a is not b and a.data_ptr() == b.data_ptr() for a, b in pairs)
    assert copy.lm_head.weight is copy.model.embed_tokens.weight  # still tied
    before = snapshot(teacher)
    copy.requires_grad_(False)
    copy.to(torch.bfloat16)  # rebinding in the copy leaves the teacher alone
    assert_intact(teacher, before)


def test_a_lora_gkd_cell_shares_the_teachers_weights_and_matches_the_deep_copy_layout(tmp_path,
                                                                                       monkeypatch):
    from qcompare_plugins.torchao_quantizer import TorchaoQuantizer

    runs = {}
    for layout in ("copied", "shared"):
        monkeypatch.setattr(TorchaoQuantizer, "shares_teacher_weights", layout == "shared")
        pipeline, cell, ctx = pipeline_and_cell(tmp_path / layout)
        before = snapshot(ctx.teacher)
        seen = {}
        record_fake_quant_logits(monkeypatch, TorchaoQuantizer, seen)
        converted = converted_model(pipeline)
        monkeypatch.undo()
        assert converted.cost["student_weights"] == layout and converted.cost["teacher_layout"] == "shared"
        assert_intact(ctx.teacher, before)  # after training and after convert
        with torch.no_grad():
            logits = converted.model(IDS).logits
        assert torch.equal(logits, seen["student"])  # fake quant ≡ converted, adapters included
        runs[layout] = ([e["loss"] for e in converted.log], seen, converted.model)
    copied, shared = runs["copied"], runs["shared"]
    assert copied[0] == shared[0] and len(shared[0]) == 3  # the same loss curve, bit for bit
    assert torch.equal(copied[1]["student"], shared[1]["student"])
    # the runner's copy already sat on the teacher's memory; the float lm_head (skipped by
    # the quantizer) still does in the converted model, the int weights are new tensors
    assert shared[1]["shared_during_training"] >= copied[1]["shared_during_training"] > 0
    lm_head = shared[2].lm_head.weight  # peft all-linear leaves the output layer out
    assert lm_head.data_ptr() in shared[1]["teacher_ptrs"]


@pytest.mark.parametrize("qparams", ["bits = 4\ngroup_size = 32\nsymmetric = false\nembeddings = true",
                                     "bits = 8\ngroup_size = 0\nactivations = \"int8\"",
                                     "bits = 4\ngroup_size = 32\nsymmetric = false\npacking = \"tinygemm\""])
def test_convert_never_writes_into_the_teachers_memory(tmp_path, qparams):
    pipeline, cell, ctx = pipeline_and_cell(tmp_path, qparams=qparams, distiller="none", dparams="")
    before = snapshot(ctx.teacher)
    ptrs = {p.data_ptr() for p in ctx.teacher.parameters()}
    converted = converted_model(pipeline)
    assert converted.cost["student_weights"] == "shared"
    assert_intact(ctx.teacher, before)
    with torch.no_grad():
        converted.model(IDS)
    if "tinygemm" not in qparams:  # tinygemm's prepare casts the student to bfloat16: its own copy
        assert any(p.data_ptr() in ptrs for p in converted.model.parameters())


def test_a_lora_sft_cell_leaves_the_teacher_intact(tmp_path):
    pipeline, cell, ctx = pipeline_and_cell(tmp_path, distiller="sft", dparams=TRAIN + "lora_r = 4\n")
    before = snapshot(ctx.teacher)
    converted = converted_model(pipeline)
    assert converted.cost["student_weights"] == "shared" and len(converted.log) == 3
    assert_intact(ctx.teacher, before)


class Stop(Exception):
    pass


@pytest.mark.parametrize("case", ["full fine-tuning", "gptq"])
def test_full_fine_tuning_or_gptq_gets_a_deep_copy(tmp_path, monkeypatch, case):
    from qcompare.sdk.registry import get_registry

    if case == "gptq":
        kw = dict(quantizer="gptq", qparams="bits = 4\ngroup_size = 32", distiller="none", dparams="")
    else:
        kw = dict(dparams=LORA_GKD.replace("lora_r = 4", "lora_r = 0"))
    pipeline, cell, ctx = pipeline_and_cell(tmp_path, **kw)
    qcls = get_registry().get("quantizer", cell.quantizer.name)
    seen = {}

    def prepare(self, model, params, context):  # what the runner hands the quantizer; stop there
        ptrs = {p.data_ptr() for p in context.teacher.parameters()}
        seen["shared"] = sum(p.data_ptr() in ptrs for p in model.parameters())
        raise Stop

    monkeypatch.setattr(qcls, "prepare", prepare)
    with pytest.raises(Stop):
        converted_model(pipeline)
    assert seen["shared"] == 0
