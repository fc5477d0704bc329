"""The shipped toy world: deterministic data, a clean tokenizer, a model that knows it."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from qcompare.sdk.registry import get_registry
from qcompare_plugins.toy import HELDOUT, MODEL, MOE_MODEL, NARROW_MODEL, TASKS, TRAIN
from qcompare_plugins.toy.world import (FUNCTION_WORDS, LORE, benchmarks, chat_rows, heldout_texts, make_world,
                                        next_words, pretrain_texts, seq_terms)

pytestmark = pytest.mark.e2e  # runs whole cells, runs or commands (not in the fast subset)

MC_TASKS = ["toy_facts", "toy_habits", "toy_arith", "toy_seq"]
UNCOVERED = ["toy_lore", "toy_minus"]


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


def test_uncovered_knowledge_is_in_pretraining_and_never_in_the_chat_data():
    """Pets and subtraction: the teacher learns them, toy-chat never asks or answers them, and the
    held-out differences are in no training text."""
    world = make_world(0)
    chat = " ".join(m["content"] for r in chat_rows(world) for m in r["messages"]).split()
    assert not {"pet", "keeps", "minus", "take", "away", "leaves"} & set(chat)
    assert not set(LORE["pet"][0]) & set(chat)
    text = pretrain_texts(world)
    e, pet = next(iter(world.lore["pet"].items()))
    assert f"the pet of {e} is {pet} ." in text and f"{e} keeps a {pet} ." in text
    assert not set(world.minus_train) & set(world.minus_test)
    for doc in benchmarks(world)["toy_minus"]:
        answered = f"{doc['query']} {doc['choices'][doc['gold']]}"
        assert not any(f" {answered} " in f" {t} " for t in text), answered
    # adding them left the covered world as it was: same facts, same chat data
    assert chat_rows(world) == read_jsonl(TRAIN)


def test_habits_are_uncertain_in_the_chat_data():
    """The chat data holds sampled habits, so many labels are not the most likely value:
    the teacher's soft targets carry what the labels do not."""
    world = make_world(0)
    answers = {r["messages"][-1]["content"] for r in chat_rows(world)}
    drinks = world.habits["drinks"]
    not_mode = sum(bool({f"{e} drinks {vs[1]} .", f"{e} drinks {vs[2]} ."} & answers) for e, vs in drinks.items())
    assert 0.3 < not_mode / len(drinks) < 0.7


def test_next_word_items_are_the_worlds_answers_at_every_knowledge_position():
    world = make_world(0)
    items = {d["context"]: d["word"] for d in next_words(world)}
    assert len(items) == len(next_words(world))  # one item per position
    assert not set(items.values()) & set(FUNCTION_WORDS)
    for e in world.entities:
        for attr, values in world.facts.items():
            assert items[f"the {attr} of {e} is"] == values[e]
        assert items[f"{e} lives in"] == world.facts["home"][e]
        assert items[f"{e} keeps a"] == world.lore["pet"][e]
        assert items[f"{e} drinks"] == world.habits["drinks"][e][0]  # the usual one, not a sample
    for x, y in world.arith_test:  # held-out sums count too, in both phrasings
        assert items[f"{x} plus {y} is"] == items[f"{x} and {y} make"] == str(x + y)
    for x, y in world.minus_test:
        assert items[f"{x} minus {y} is"] == items[f"{x} take away {y} leaves"] == str(x - y)
    for s, d in world.seq_test:  # two terms decide the rest
        terms = list(map(str, seq_terms(s, d)))
        assert items["count " + " ".join(terms[:2])] == terms[2] and items["count " + " ".join(terms[:4])] == terms[4]
    # what the world leaves open is no item: which entity, which operand
    assert "the home of" not in items and "3 plus" not in items and "count 4" not in items


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


@pytest.mark.parametrize("folder", [MODEL, MOE_MODEL, NARROW_MODEL], ids=["dense", "moe", "narrow"])
def test_shipped_model_scores_high_on_the_toy_tasks_through_lm_eval(tokenizer, folder):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model = AutoModelForCausalLM.from_pretrained(folder)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=64, device="cpu")
    tm = TaskManager(include_path=str(TASKS))
    out = lm_eval.simple_evaluate(model=lm, tasks=["toy", "toy_uncovered", "toy_gen", "toy_usual", "toy_next"],
                                  task_manager=tm,
                                  limit=40)
    results = out["results"]
    # held-out count sequences and differences are the hardest (all items: dense 0.92 and 0.95, MoE 0.87 and 0.91,
    # narrow 0.97 and 0.95)
    floors = {"toy_seq": 0.8, "toy_minus": 0.8}
    for task in MC_TASKS + UNCOVERED:
        assert results[task]["acc,none"] >= floors.get(task, 0.9), (task, results[task])
    assert results["toy"]["acc,none"] >= 0.9
    assert results["toy_gen"]["exact_match,strip"] >= 0.8, results["toy_gen"]
    # Ranking an entity's own habits is harder (chance 0.25, the teacher ~0.87).
    assert results["toy_usual"]["acc,none"] >= 0.7, results["toy_usual"]
    # the next word over the whole vocabulary (all items: dense 0.983, narrow 0.965)
    assert results["toy_next"]["acc,none"] >= 0.9, results["toy_next"]


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


def test_the_build_is_byte_for_byte_reproducible(tmp_path):
    """Two builds of the same seed write identical files: data, tasks, tokenizer and weights (a
    short training here; `python -m qcompare_plugins.toy.build --check` rebuilds the shipped teachers in full)."""
    from qcompare_plugins.toy.build import build

    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        build(0, out, steps=3, only="dense")
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files and files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    shipped = [f for f in files if f.parts[0] in ("data", "tasks")]
    assert shipped and all((a / f).read_bytes() == (MODEL.parent / f).read_bytes() for f in shipped)
