"""The shipped toy world: deterministic data, a clean tokenizer, a model that knows it."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from qcompare.plugins import get_registry
from qcompare_plugins.toy import HELDOUT, MODEL, MOE_MODEL, TASKS, TRAIN
from qcompare_plugins.toy.world import benchmarks, chat_rows, heldout_texts, make_world, pretrain_texts

MC_TASKS = ["toy_facts", "toy_habits", "toy_arith", "toy_seq"]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL)


def test_world_is_deterministic_for_a_seed():
    a, b, c = make_world(0), make_world(0), make_world(1)
    assert a == b
    assert chat_rows(a) == chat_rows(b) and benchmarks(a) == benchmarks(b) and heldout_texts(a) == heldout_texts(b)
    assert a.facts != c.facts and chat_rows(a) != chat_rows(c)


def test_held_out_sums_and_sequences_never_appear_in_training_text():
    world = make_world(0)
    assert not set(world.arith_train) & set(world.arith_test)
    assert not set(world.seq_train) & set(world.seq_test)
    seen = pretrain_texts(world) + [m["content"] for r in chat_rows(world) for m in r["messages"]]
    for doc in benchmarks(world)["toy_arith"] + benchmarks(world)["toy_seq"]:
        answered = f"{doc['query']} {doc['choices'][doc['gold']]}"
        assert not any(f" {answered} " in f" {t} " for t in seen), answered


def test_habits_are_uncertain_in_the_chat_data():
    """The chat data holds sampled habits, so many labels are not the most likely value:
    the teacher's soft targets carry what the labels do not."""
    world = make_world(0)
    answers = {r["messages"][-1]["content"] for r in chat_rows(world)}
    drinks = world.habits["drinks"]
    not_mode = sum(bool({f"{e} drinks {vs[1]} .", f"{e} drinks {vs[2]} ."} & answers) for e, vs in drinks.items())
    assert 0.3 < not_mode / len(drinks) < 0.7


def test_shipped_files_are_the_seed_0_world():
    world = make_world(0)
    assert read_jsonl(TRAIN) == chat_rows(world)
    assert [r["text"] for r in read_jsonl(HELDOUT)] == heldout_texts(world)
    for task, docs in benchmarks(world).items():
        assert read_jsonl(TASKS / "data" / f"{task}.jsonl") == docs


def test_tokenizer_has_pad_eos_and_a_chat_template_with_no_unknown_tokens(tokenizer):
    assert tokenizer.pad_token_id is not None and tokenizer.eos_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    rows = read_jsonl(TRAIN)
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    texts += [r["text"] for r in read_jsonl(HELDOUT)]
    texts += [d["query"] + " " + c for d in benchmarks(make_world(0))["toy_facts"] for c in d["choices"]]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids, text
    # GKD's split: the prompt rendered with add_generation_prompt is a token prefix of the chat.
    messages = rows[0]["messages"]
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt = encode(tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False))
    full = encode(tokenizer.apply_chat_template(messages, tokenize=False))
    assert full[: len(prompt)] == prompt and full[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(full[len(prompt) : -1]) == messages[-1]["content"]


@pytest.mark.parametrize("folder", [MODEL, MOE_MODEL], ids=["dense", "moe"])
def test_shipped_model_scores_high_on_the_toy_tasks_through_lm_eval(tokenizer, folder):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model = AutoModelForCausalLM.from_pretrained(folder)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=64, device="cpu")
    tm = TaskManager(include_path=str(TASKS))
    out = lm_eval.simple_evaluate(model=lm, tasks=["toy", "toy_gen", "toy_usual"], task_manager=tm, limit=40)
    results = out["results"]
    # the MoE twin extrapolates count sequences less well (toy_seq ~0.77 against the dense 0.93)
    floors = {"toy_seq": 0.7} if folder == MOE_MODEL else {}
    for task in MC_TASKS:
        assert results[task]["acc,none"] >= floors.get(task, 0.9), (task, results[task])
    assert results["toy"]["acc,none"] >= 0.9
    assert results["toy_gen"]["exact_match,strip"] >= 0.8, results["toy_gen"]
    # Ranking an entity's own habits is harder (chance 0.25, the teacher ~0.87).
    assert results["toy_usual"]["acc,none"] >= 0.7, results["toy_usual"]


def test_registered_names_resolve():
    registry = get_registry()
    for name in ("toy-qwen3", "toy-qwen3-moe"):
        folder, _ = registry.models[name].obj
        assert (folder / "config.json").exists() and (folder / "tokenizer.json").exists()
    moe = json.loads((registry.models["toy-qwen3-moe"].obj[0] / "config.json").read_text())
    assert moe["model_type"] == "qwen3_moe" and moe["num_local_experts"] == 8
    assert registry.datasets["toy-chat"].obj[0] == TRAIN and TRAIN.exists()
    assert registry.datasets["toy-heldout"].obj[0] == HELDOUT and HELDOUT.exists()
    assert TASKS in registry.task_folders
