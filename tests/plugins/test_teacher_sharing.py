"""Teacher work shared across cells (the λ=0 teacher cache) and within a LoRA cell (the
student with adapters and fake quantization off is the teacher)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from qcompare.errors import QcompareError
from qcompare.sdk import fake_quantizers
from qcompare.testing import tiny_chat, tiny_context, tiny_student, tiny_teacher, tiny_tokenizer
from qcompare_plugins.distillers import GKDDistiller
from qcompare_plugins.distillers.gkd import GKDParams
from qcompare_plugins.distillers.shared_teacher import share_base_weights, teacher_mode
from qcompare_plugins.distillers.teacher_cache import clear_memory

pytestmark = pytest.mark.e2e  # runs whole cells, runs or commands (not in the fast subset)

TINY = dict(max_steps=4, max_length=64, learning_rate=1e-3, per_device_train_batch_size=2, max_new_tokens=8)


@pytest.fixture(scope="module")
def world():
    tokenizer = tiny_tokenizer()
    return tokenizer, tiny_teacher(), tiny_chat()


def run_cell(tmp_path, name, seed=0, peers=4):
    """A cell of a run folder, as the runner hands it to plugins: one of ``peers`` cells (a sweep)
    that train on the same batches."""
    from qcompare.results.store import RunStore

    store = RunStore(tmp_path / "run")
    return tiny_context(store.cell_dir(name), seed=seed, shared_dir=store.shared, peers=peers)


def distill(world, context, **params):
    tokenizer, teacher, data = world
    result = GKDDistiller().distill(tiny_student(teacher), GKDParams(**{**TINY, **params}), replace(context, teacher=teacher, tokenizer=tokenizer, data=data))
    return [(e["step"], e["loss"]) for e in result.log], result.cost


@pytest.mark.parametrize("mode", ["hidden", "logits"])
def test_a_cached_lambda0_cell_has_the_same_loss_curve_and_no_teacher_forwards(world, tmp_path, mode):
    clear_memory()
    reference, ref_cost = distill(world, run_cell(tmp_path, "plain"), lmbda=0.0, teacher_cache=False)
    assert ref_cost["teacher_forwards"] == 4 and ref_cost["teacher_cached_tokens"] == 0
    first, cost = distill(world, run_cell(tmp_path, "first"), lmbda=0.0, teacher_cache=mode)  # fills the cache
    assert first == reference and cost["teacher_forwards"] == 4 and cost["teacher_cache"].startswith(mode)
    folder = tmp_path / "run" / "shared" / "teacher"
    shards = list(folder.glob(f"*/{mode}/shard-*.safetensors"))
    assert len(shards) == 1 and not list(folder.glob("*/*/.tmp-*"))
    assert cost["teacher_cache_bytes"] == shards[0].stat().st_size > 0

    clear_memory()  # a fresh process (another Ray worker) reads the cache from the run folder
    second, cost = distill(world, run_cell(tmp_path, "second"), lmbda=0.0, learning_rate=1e-3, teacher_cache=mode)
    assert second == reference  # bit-identical, not approximately
    assert cost["teacher_forwards"] == 0 and cost["teacher_forward_seconds"] == 0
    assert cost["teacher_cached_tokens"] == ref_cost["teacher_tokens"] and cost["teacher_tokens"] == 0
    saved = cost["flops"] - cost["flops_spent"]  # a teacher forward per cached token, less the head recomputed
    assert (saved < 2 * cost["teacher_params"] * cost["teacher_cached_tokens"]) == (mode == "hidden")
    assert len(list(folder.glob(f"*/{mode}/shard-*.safetensors"))) == 1  # nothing new to write


def test_the_hidden_state_cache_is_exact_at_a_large_vocabulary_and_far_smaller(tmp_path):
    """Qwen3's 151,936-token vocabulary on a 64-wide model: the recomputed head gives the fresh
    forward's logits bit for bit, and an entry is vocabulary / hidden times smaller than logits."""
    tokenizer = tiny_tokenizer()
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    teacher = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)).eval()
    big = (tokenizer, teacher, tiny_chat())
    clear_memory()
    reference, _ = distill(big, run_cell(tmp_path, "plain"), lmbda=0.0, max_steps=2, teacher_cache=False)
    distill(big, run_cell(tmp_path, "fill"), lmbda=0.0, max_steps=2, teacher_cache="hidden")
    clear_memory()
    served, cost = distill(big, run_cell(tmp_path, "served"), lmbda=0.0, max_steps=2, teacher_cache="hidden")
    assert served == reference and cost["teacher_forwards"] == 0
    hidden = sum(p.stat().st_size for p in (tmp_path / "run" / "shared").rglob("hidden/shard-*"))
    distill(big, run_cell(tmp_path, "logits"), lmbda=0.0, max_steps=2, teacher_cache="logits")
    logits = sum(p.stat().st_size for p in (tmp_path / "run" / "shared").rglob("logits/shard-*"))
    assert logits > 100 * hidden  # answer rows × 151,936 against every position × 64


def test_auto_caches_hidden_states_only_when_other_cells_share_the_batches_and_the_body_dominates():
    from qcompare.sdk.api import ModelFacts
    from qcompare_plugins.distillers.gkd import cache_choice

    params = GKDParams(lmbda=0.0)
    qwen3_4b = ModelFacts(4_022_468_096, 151_936, 2560, tied_embeddings=True)
    assert cache_choice(params, qwen3_4b, peers=4)[0] == "hidden"
    assert cache_choice(params, qwen3_4b, peers=1) == ("off", "no other cell of the run trains on the same batches")
    # the toy model's weights under Qwen3's vocabulary: the head is almost all of the work
    mode, why = cache_choice(params, ModelFacts(19_600_000, 151_936, 64), peers=4)
    assert mode == "off" and "head is 9" in why
    assert cache_choice(GKDParams(lmbda=1.0), qwen3_4b, 4)[0] == "off"
    assert cache_choice(GKDParams(lmbda=0.0, teacher_cache="logits"), qwen3_4b, 1)[0] == "logits"
    assert GKDParams(teacher_cache=True).teacher_cache == "auto" and GKDParams(teacher_cache=False).teacher_cache == "off"


def test_a_different_learning_rate_reuses_the_cache_in_the_same_process(world, tmp_path):
    clear_memory()
    distill(world, run_cell(tmp_path, "lr1"), lmbda=0.0, learning_rate=1e-3)  # auto: other cells share batches
    reference, _ = distill(world, run_cell(tmp_path, "plain"), lmbda=0.0, learning_rate=3e-3, teacher_cache=False)
    curve, cost = distill(world, run_cell(tmp_path, "lr2"), lmbda=0.0, learning_rate=3e-3)
    assert curve == reference and cost["teacher_forwards"] == 0


def test_the_cache_is_not_used_on_policy_or_outside_a_run_folder(world, tmp_path):
    clear_memory()
    _, cost = distill(world, tiny_context(tmp_path / "loose"), lmbda=0.0)
    assert cost["teacher_forwards"] == 4 and "teacher_cache_bytes" not in cost
    distill(world, run_cell(tmp_path, "off"), lmbda=0.0)
    _, cost = distill(world, run_cell(tmp_path, "on"), lmbda=1.0)
    assert cost["teacher_forwards"] == 4 and cost["teacher_cached_tokens"] == 0


def lora_student(teacher):
    from peft import LoraConfig, get_peft_model

    student = tiny_student(teacher)
    assert share_base_weights(teacher, student) is None
    model = get_peft_model(student, LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():  # adapters that change the function, as after some training
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model


def test_the_shared_student_in_teacher_mode_gives_the_float_teachers_logits_exactly(world):
    tokenizer, teacher, _ = world
    model = lora_student(teacher)
    ids = tokenizer(["<|user|> what is 3 plus 4 <|end|> <|assistant|> it is 7"], return_tensors="pt").input_ids
    base = model.get_base_model()
    assert base.model.layers[0].mlp.up_proj.base_layer.weight.data_ptr() == teacher.model.layers[0].mlp.up_proj.weight.data_ptr()
    with torch.no_grad():
        expected = teacher(ids).logits
        with teacher_mode(model):
            shared = model(ids).logits
            assert not any(q.enabled for q in fake_quantizers(model))
        student = model(ids).logits
    assert shared.dtype == torch.float32 and torch.equal(shared, expected)
    assert not torch.allclose(student, expected, atol=1e-2)  # adapters and fake quant are back on
    assert model.training and all(q.enabled for q in fake_quantizers(model))


def test_lora_training_with_the_shared_teacher_matches_two_copies(world, tmp_path):
    tokenizer, teacher, data = world
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    grads = [p.requires_grad for p in teacher.parameters()]
    curves = {}
    for shared in (False, True):
        params = GKDParams(**TINY, lmbda=0.5, lora_r=4, shared_teacher=shared)
        context = tiny_context(tmp_path / str(shared), seed=3)
        result = GKDDistiller().distill(tiny_student(teacher), params, replace(context, teacher=teacher, tokenizer=tokenizer, data=data))
        assert result.cost["teacher_layout"] == ("shared" if shared else "separate")
        curves[shared] = [(e["step"], e["loss"], e["on_policy"]) for e in result.log]
    assert [c[2] for c in curves[True]] == [c[2] for c in curves[False]] and 0 < sum(c[2] for c in curves[True]) < 4
    for (_, a, _), (_, b, _) in zip(curves[False], curves[True]):
        assert a == b  # bit-identical on CPU: the same float teacher logits either way
    # the teacher the runner keeps for the next cell is untouched
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert [p.requires_grad for p in teacher.parameters()] == grads


def test_sharing_is_refused_when_the_quantizer_changed_the_weights(world, tmp_path):
    tokenizer, teacher, data = world
    student = tiny_student(teacher)
    with torch.no_grad():
        student.model.layers[1].self_attn.o_proj.weight.mul_(1.01)  # as GPTQ/AWQ would
    reason = share_base_weights(teacher, student)
    assert reason and "o_proj" in reason
    params = GKDParams(**TINY, lmbda=0.0, lora_r=4)
    result = GKDDistiller().distill(student, params, tiny_context(tmp_path, teacher=teacher, tokenizer=tokenizer, data=data))
    assert result.cost["teacher_layout"].startswith("separate (") and "o_proj" in result.cost["teacher_layout"]


def test_use_vllm_says_what_to_install_or_why_not(world, tmp_path):
    tokenizer, teacher, data = world
    with pytest.raises(QcompareError, match="vllm|vLLM") as e:
        GKDDistiller().distill(tiny_student(teacher), GKDParams(**TINY, use_vllm=True), tiny_context(tmp_path, teacher=teacher, tokenizer=tokenizer, data=data))
    assert "\n" not in str(e.value)
    assert "pip install vllm" in str(e.value) or "DistillationTrainer" in str(e.value)


def test_rollouts_keep_the_kv_cache_under_gradient_checkpointing(world, tmp_path):
    from qcompare_plugins.distillers.cost import CostMeter

    tokenizer, teacher, data = world
    params = GKDParams(**TINY, lmbda=1.0, gradient_checkpointing=True)
    trainer = GKDDistiller().make_trainer(teacher, tiny_student(teacher), tokenizer, data, params,
                                          tiny_context(tmp_path), CostMeter("cpu"))
    assert trainer.args.gradient_checkpointing  # TRL would have set use_cache=False here
    assert trainer.generation_config.use_cache is True and trainer.generation_kwargs["use_cache"] is True
    assert trainer.generation_config.do_sample and trainer.generation_config.max_new_tokens == 8


def test_two_processes_filling_one_cache_write_separate_whole_shards(tmp_path):
    from qcompare_plugins.distillers.teacher_cache import TeacherCache

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 40, (2, 9), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    inputs["labels"][:, :5] = -100
    logits = torch.randn(2, 8, 45, generator=g)
    a, b = TeacherCache(tmp_path, 10**9, 10**9), TeacherCache(tmp_path, 10**9, 10**9)  # as two Ray workers
    key = a.key(inputs)
    a.store(inputs, key, logits)
    b.store(inputs, key, logits)
    a.save()
    b.save()
    assert len(list(tmp_path.glob("shard-*.safetensors"))) == 2 and not list(tmp_path.glob(".tmp-*"))
    fresh = TeacherCache(tmp_path, 10**9, 10**9)
    fresh.refresh()
    served = fresh.lookup(inputs, key, 45)
    need = inputs["labels"][:, 1:] != -100
    assert torch.equal(served[need], logits[need]) and not served[~need].any()
    # the same examples in another order or padding are another batch (other float sums)
    swapped = {k: v.flip(0) for k, v in inputs.items()}
    assert fresh.key(swapped) != key and fresh.lookup(swapped, fresh.key(swapped), 45) is None


def test_past_its_memory_budget_the_cache_spills_to_disk_and_stops_at_the_disk_budget(tmp_path):
    from qcompare_plugins.distillers.teacher_cache import TeacherCache

    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        ids = torch.randint(5, 40, (2, 9), generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    hidden = [torch.randn(2, 9, 16, generator=g) for _ in batches]  # 1,152 bytes each
    cache = TeacherCache(tmp_path, max_bytes=1200, max_disk_bytes=2000, mode="hidden")
    for inputs, h in zip(batches, hidden):
        cache.store(inputs, cache.key(inputs), h)
    assert len(cache.entries) == 1 and len(cache.on_disk) == 1 and cache.full  # memory, disk, no room
    assert torch.equal(cache.get(cache.key(batches[1])), hidden[1])  # served memory-mapped from its shard
    assert cache.get(cache.key(batches[2])) is None
    cache.save()  # the disk budget is spent: the in-memory entry stays this process's own
    other = TeacherCache(tmp_path, max_bytes=0, max_disk_bytes=2000, mode="hidden")  # another worker
    other.refresh()
    assert not other.entries and torch.equal(other.get(other.key(batches[1])), hidden[1])
    assert other.get(other.key(batches[0])) is None and len(list(tmp_path.glob("shard-*"))) == 1


def test_cached_results_do_not_depend_on_which_cell_ran_first(world, tmp_path):
    """Seeds group the examples into other batches: a seed-1 cell must get the same curve
    whether a seed-0 cell filled the cache before it or not (and the same as without a cache)."""
    clear_memory()
    alone, _ = distill(world, run_cell(tmp_path / "a", "seed1", seed=1), lmbda=0.0)
    clear_memory()
    distill(world, run_cell(tmp_path / "b", "seed0"), lmbda=0.0)
    after, cost = distill(world, run_cell(tmp_path / "b", "seed1", seed=1), lmbda=0.0)
    uncached, _ = distill(world, run_cell(tmp_path / "c", "seed1", seed=1), lmbda=0.0, teacher_cache=False)
    assert after == alone == uncached
    assert cost["teacher_forwards"] == 4  # its batches are its own


@pytest.mark.parametrize("qparams", [dict(bits=4, group_size=32, embeddings=True), dict(bits=8, activations="int8")])
def test_teacher_mode_switches_off_the_torchao_plugins_fake_quantizers(world, tmp_path, qparams):
    import copy

    from peft import LoraConfig, get_peft_model

    from qcompare.sdk.registry import get_registry

    tokenizer, teacher, _ = world
    quantizer = get_registry().get("quantizer", "torchao")
    params = quantizer.Params(**qparams)
    student = quantizer().prepare(copy.deepcopy(teacher), params, tiny_context(tmp_path))
    assert share_base_weights(teacher, student) is None
    model = get_peft_model(student, LoraConfig(r=4, target_modules="all-linear"))
    ids = tokenizer(["<|user|> what is 3 plus 4 <|end|> <|assistant|> it is 7"], return_tensors="pt").input_ids
    with torch.no_grad():
        with teacher_mode(model):
            assert torch.equal(model(ids).logits, teacher(ids).logits)
        assert not torch.equal(model(ids).logits, teacher(ids).logits)


def test_a_lambda0_sweep_through_the_runner_runs_the_teacher_once(tmp_path):
    import json

    from qcompare.engine.recipe import load_recipe
    from qcompare.engine.runner import Runner
    from qcompare.results.store import RunStore

    clear_memory()
    recipe = tmp_path / "sweep.toml"
    recipe.write_text("""
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
""")
    records = Runner(load_recipe(recipe), RunStore(tmp_path / "run")).run()
    assert [r.status for r in records] == ["done", "done"]
    forwards = sorted(r.cost["teacher_forwards"] for r in records)
    assert forwards == [0, 3]
    logs = [(tmp_path / "run" / "cells" / r.id / "train_log.jsonl").read_text().splitlines() for r in records]
    assert json.loads(logs[0][0])["loss"] == json.loads(logs[1][0])["loss"]  # step 1: same student, same teacher
    assert list((tmp_path / "run" / "shared" / "teacher").glob("*/hidden/shard-*.safetensors"))
