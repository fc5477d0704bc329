"""The built-in evaluators on a tiny Qwen3 and local lm-eval tasks (tests/fixtures/evaltasks)."""

import copy
import json
import logging
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from qcompare import hookimpl
from qcompare.sdk.api import CellContext, CellProgress
from qcompare.errors import QcompareError
from qcompare.sdk.registry import add_plugin, get_registry, remove_plugin

TASKS = Path(__file__).resolve().parents[1] / "fixtures" / "evaltasks"
HELDOUT = TASKS / "heldout.jsonl"
SPECIALS = ["<unk>", "<pad>", "<eos>"]


@pytest.fixture(scope="module")
def tokenizer():
    words = set()
    for path in TASKS.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            for value in json.loads(line).values():
                words.update(" ".join(value if isinstance(value, list) else [str(value)]).split())
    vocab = {w: i for i, w in enumerate(SPECIALS + sorted(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")


@pytest.fixture(scope="module")
def teacher(tokenizer):
    config = transformers.Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    return transformers.Qwen3ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def parrot(teacher, tokenizer):
    """A model that says "blue" after anything: one huge constant feature in every token
    embedding survives to the last norm, and only "blue"'s output row reads it."""
    model = copy.deepcopy(teacher)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 50.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[tokenizer.convert_tokens_to_ids("blue"), 0] = 20.0
    return model


class Bars:
    """A CellProgress that records every bar and how far it got."""

    def __init__(self):
        self.bars = {}

    def start(self, description, total):
        self.bars[description] = [total, 0]
        return (lambda n=1: self.bars[description].__setitem__(1, self.bars[description][1] + n)), (lambda: None)


def make_context(tmp_path, tokenizer, teacher, bars=None):
    return CellContext(
        cell_dir=tmp_path, seed=0, device="cpu", tokenizer=tokenizer, teacher=teacher,
        task_folders=[TASKS], progress=CellProgress(bars.start if bars else None),
    )


def evaluate(name, model, tokenizer, context, **params):
    evaluator = get_registry().get("evaluator", name)
    return evaluator().evaluate(model, evaluator.Params(**params), context)


def test_evaluators_register_through_entry_point():
    assert {"lm_eval", "perplexity", "kl_to_teacher"} <= set(get_registry().names("evaluator"))


def test_lm_eval_scores_a_model_that_always_says_blue(parrot, tokenizer, teacher, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # tiny_mc.yaml names its JSONL relative to itself, not to here
    bars = Bars()
    torch.manual_seed(123)
    before = (torch.get_rng_state(), random.getstate())
    from torch.utils import collect_env

    surveys = []  # lm-eval's environment report: ~50 subprocesses a call, for fields nobody reads
    monkeypatch.setattr(collect_env, "get_pretty_env_info", lambda: surveys.append(1) or "")
    result = evaluate("lm_eval", parrot, tokenizer, make_context(tmp_path, tokenizer, teacher, bars), tasks=["tiny"], batch_size=4)
    assert surveys == []
    # The group expands to its tasks; 4 of 10 MC answers and 4 of 8 generation answers are "blue".
    assert result.metrics["tiny_mc/acc"] == pytest.approx(0.4)
    assert result.metrics["tiny_gen/exact_match"] == pytest.approx(0.5)
    assert result.items["tiny_mc"].metrics["acc"] == [1, 0, 1, 0, 0, 1, 0, 1, 0, 0]
    assert result.items["tiny_gen"].metrics["exact_match"] == [1, 0, 1, 0, 1, 0, 1, 0]
    # items are named by doc id and lm-eval's hash of the document: stable across runs and orders
    assert result.items["tiny_mc"].ids[0].startswith("0:") and len(set(result.items["tiny_mc"].ids)) == 10
    assert result.stderr["tiny_mc/acc"] == pytest.approx(math.sqrt(0.4 * 0.6 / 9))
    # A bar per kind of request, each advanced once per request: 10 docs x 4 choices, 8 generations.
    assert bars.bars == {"lm_eval: tiny (loglikelihood)": [40, 40], "lm_eval: tiny (generate_until)": [8, 8]}
    # lm-eval reseeds the global RNGs; the evaluator puts them back.
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert Path.cwd() == tmp_path


def test_lm_eval_items_follow_limit_and_average_to_the_metric(teacher, tokenizer, tmp_path, caplog, capfd):
    context = make_context(tmp_path, tokenizer, teacher)
    with caplog.at_level(logging.INFO):
        result = evaluate("lm_eval", teacher, tokenizer, context, tasks=["tiny_mc", "tiny_gen"], limit=0.5)
    # lm-eval's INFO/WARNING chatter and its tqdm bars stay hidden.
    assert not [r for r in caplog.records if r.name.startswith("lm_eval") and r.levelno < logging.ERROR]
    assert "requests" not in capfd.readouterr().err
    mc, gen = result.items["tiny_mc"].metrics["acc"], result.items["tiny_gen"].metrics["exact_match"]
    assert len(mc) == 5 and len(gen) == 4
    assert sum(mc) / 5 == pytest.approx(result.metrics["tiny_mc/acc"])
    assert sum(gen) / 4 == pytest.approx(result.metrics["tiny_gen/exact_match"])


@pytest.mark.e2e
def test_lm_eval_unknown_task_says_how_to_run_offline(teacher, tokenizer, tmp_path):
    with pytest.raises(QcompareError, match=r"unknown task 'tiny_mcq' \(did you mean 'tiny_mc'\?\).*include_path"):
        evaluate("lm_eval", teacher, tokenizer, make_context(tmp_path, tokenizer, teacher), tasks=["tiny_mcq"])


def test_lm_eval_hub_task_offline_names_task_and_include_path(teacher, tokenizer, tmp_path, monkeypatch):
    _offline(monkeypatch)
    with pytest.raises(QcompareError, match=r"task 'arc_easy' can't load its dataset.*include_path"):
        evaluate("lm_eval", teacher, tokenizer, make_context(tmp_path, tokenizer, teacher), tasks=["arc_easy"])


def test_lm_eval_rejects_missing_include_path(teacher, tokenizer, tmp_path):
    with pytest.raises(QcompareError, match="include_path"):
        evaluate("lm_eval", teacher, tokenizer, make_context(tmp_path, tokenizer, teacher), tasks=["tiny_mc"], include_path=[str(tmp_path / "nope")])


def test_perplexity_equals_exp_of_direct_cross_entropy(teacher, tokenizer, tmp_path):
    text = "the sky is blue the sea is blue the coal is black"
    path = tmp_path / "short.jsonl"
    path.write_text(json.dumps({"text": text}) + "\n")
    result = evaluate("perplexity", teacher, tokenizer, make_context(tmp_path, tokenizer, teacher), dataset=str(path))
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        direct = teacher(ids, labels=ids).loss.item()
    assert result.metrics["short/ppl"] == pytest.approx(math.exp(direct), rel=1e-5)
    assert result.items["short"].metrics["nll"] == [pytest.approx(direct, rel=1e-5)]


def test_sliding_window_scores_every_token_once(teacher, tokenizer, tmp_path):
    from qcompare_plugins.evaluators.perplexity import document_nll

    ids = tokenizer(json.loads(HELDOUT.read_text().splitlines()[3])["text"])["input_ids"]  # 45 tokens
    logits = lambda chunk: teacher(torch.tensor([chunk])).logits[0, :-1]  # noqa: E731
    with torch.no_grad():
        whole = F.cross_entropy(logits(ids), torch.tensor(ids[1:]), reduction="sum").item()
        assert document_nll(teacher, ids, 64, 32) == (pytest.approx(whole, rel=1e-5), 44)
        # Disjoint windows (stride == window): each chunk scored on its own, first token unscored.
        chunks = [ids[i : i + 10] for i in range(0, 45, 10)]
        disjoint = sum(F.cross_entropy(logits(c), torch.tensor(c[1:]), reduction="sum").item() for c in chunks)
        assert document_nll(teacher, ids, 10, 10) == (pytest.approx(disjoint, rel=1e-5), 40)
        # Overlapping windows score all 44 tokens once, with more context than disjoint ones.
        nll, count = document_nll(teacher, ids, 10, 5)
        assert count == 44 and nll != pytest.approx(whole, rel=1e-3)


def test_perplexity_reads_a_registered_dataset(teacher, tokenizer, tmp_path):
    class HeldOut:
        @hookimpl
        def register_datasets(self, register):
            register("test-heldout", HELDOUT, "held-out text for tests")

    plugin = HeldOut()
    add_plugin(plugin)
    try:
        bars = Bars()
        context = make_context(tmp_path, tokenizer, teacher, bars)
        result = evaluate("perplexity", teacher, tokenizer, context, dataset="test-heldout", max_samples=4, max_length=16, stride=8)
    finally:
        remove_plugin(plugin)
    assert len(result.items["test-heldout"].ids) == 4 and bars.bars == {"perplexity: test-heldout": [4, 4]}
    vocab = len(tokenizer)
    assert 1 < result.metrics["test-heldout/ppl"] < 2 * vocab  # a random model is near uniform
    assert result.stderr["test-heldout/ppl"] > 0


def test_kl_is_zero_for_the_teacher_and_positive_for_a_perturbed_student(teacher, tokenizer, tmp_path):
    context = make_context(tmp_path, tokenizer, teacher)
    same = evaluate("kl_to_teacher", copy.deepcopy(teacher), tokenizer, context, dataset=str(HELDOUT))
    assert same.metrics["heldout-vs-teacher/kl"] == pytest.approx(0.0, abs=1e-6)
    assert same.metrics["heldout-vs-teacher/top1_agree"] == 1.0
    assert evaluate("kl_to_teacher", teacher, tokenizer, context, dataset=str(HELDOUT)).metrics["heldout-vs-teacher/kl"] == 0.0

    student = copy.deepcopy(teacher)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    result = evaluate("kl_to_teacher", student, tokenizer, context, dataset=str(HELDOUT), max_samples=3)
    items = result.items["heldout-vs-teacher"]
    assert result.metrics["heldout-vs-teacher/kl"] > 1e-3 and len(items.ids) == 3
    # a per-token mean over documents of different lengths: the ratio of sums, its stderr a ratio estimator's
    kl, tokens = items.metrics["kl"], items.weights
    assert result.metrics["heldout-vs-teacher/kl"] == pytest.approx(sum(k * n for k, n in zip(kl, tokens)) / sum(tokens))
    from qcompare_plugins.evaluators.heldout import ratio_stderr

    assert result.stderr["heldout-vs-teacher/kl"] == pytest.approx(ratio_stderr([k * n for k, n in zip(kl, tokens)],
                                                                                tokens))
    # Against the textbook formula on the first document: mean over positions of sum p_t log(p_t / p_s).
    ids = torch.tensor([tokenizer(json.loads(HELDOUT.read_text().splitlines()[0])["text"])["input_ids"]])
    with torch.no_grad():
        p_t = teacher(ids).logits[0].double().softmax(-1)
        p_s = student(ids).logits[0].double().softmax(-1)
    direct = (p_t * (p_t.log() - p_s.log())).sum(-1).mean().item()
    assert items.metrics["kl"][0] == pytest.approx(direct, rel=1e-4)


def test_hub_dataset_offline_says_how_to_run_offline(teacher, tokenizer, tmp_path, monkeypatch):
    _offline(monkeypatch)
    with pytest.raises(QcompareError, match=r"dataset 'wikitext' can't be loaded from the hub.*local \.jsonl"):
        evaluate("perplexity", teacher, tokenizer, make_context(tmp_path, tokenizer, teacher), dataset="wikitext")


def test_params_reject_bad_values():
    registry = get_registry()
    with pytest.raises(ValueError, match="stride"):
        registry.get("evaluator", "perplexity").Params(dataset="x", max_length=8, stride=16)
    with pytest.raises(ValueError):
        registry.get("evaluator", "lm_eval").Params(tasks=["tiny_mc"], batch_size=0)
    with pytest.raises(ValueError):
        registry.get("evaluator", "lm_eval").Params(tasks=[])


def test_lm_eval_chat_template_needs_a_template(teacher, tokenizer, tmp_path):
    with pytest.raises(QcompareError, match="chat template"):
        evaluate("lm_eval", teacher, tokenizer, make_context(tmp_path, tokenizer, teacher), tasks=["tiny_mc"], apply_chat_template=True)


def _offline(monkeypatch):
    """What HF_HUB_OFFLINE=1 does, set after import (both libraries read it once)."""
    import datasets
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def test_evaluators_score_a_converted_torchao_student(teacher, tokenizer, tmp_path):
    """The real path: a low-bit model from the torchao quantizer, evaluated in memory."""
    context = make_context(tmp_path, tokenizer, teacher)
    quantizer = get_registry().get("quantizer", "torchao")
    params = quantizer.Params(bits=2, group_size=0, skip=[])
    student = quantizer().convert(quantizer().prepare(copy.deepcopy(teacher), params, context), params, context)
    kl = evaluate("kl_to_teacher", student, tokenizer, context, dataset=str(HELDOUT))
    assert kl.metrics["heldout-vs-teacher/kl"] > 1e-3
    ppl = evaluate("perplexity", student, tokenizer, context, dataset=str(HELDOUT))
    assert ppl.metrics["heldout/ppl"] != pytest.approx(evaluate("perplexity", teacher, tokenizer, context, dataset=str(HELDOUT)).metrics["heldout/ppl"])
    result = evaluate("lm_eval", student, tokenizer, context, tasks=["tiny_mc"])
    assert sum(result.items["tiny_mc"].metrics["acc"]) / 10 == pytest.approx(result.metrics["tiny_mc/acc"])


def test_lm_eval_keeps_an_untied_lm_head_untied(teacher, tokenizer, tmp_path):
    # A quantizer may give a tied model its own lm_head; HFLM's tie_weights() would undo that.
    model = copy.deepcopy(teacher)
    model.config.tie_word_embeddings = True
    head = model.lm_head.weight
    evaluate("lm_eval", model, tokenizer, make_context(tmp_path, tokenizer, teacher), tasks=["tiny_mc"], limit=2)
    assert model.lm_head.weight is head and "tie_weights" not in model.__dict__


def test_heldout_text_comes_from_txt_paragraphs_or_chat_messages(tokenizer, tmp_path):
    from qcompare_plugins.evaluators.heldout import load_documents

    txt = tmp_path / "notes.txt"
    txt.write_text("the sky is blue\n\nthe sea is blue\nthe ink is blue\n\n\n")
    assert load_documents(str(txt), tokenizer) == ["the sky is blue", "the sea is blue\nthe ink is blue"]
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "the sky is"}, {"role": "assistant", "content": "blue"}]}) + "\n")
    assert load_documents(str(chat), tokenizer) == ["the sky is\nblue"]
    with pytest.raises(QcompareError, match="no such file"):
        load_documents(str(tmp_path / "missing.jsonl"), tokenizer)


@pytest.mark.e2e
def test_lm_eval_scores_the_shipped_toy_model_on_its_toy_tasks(tmp_path):
    import qcompare_plugins.toy as toy

    tokenizer = transformers.AutoTokenizer.from_pretrained(toy.MODEL)
    model = transformers.AutoModelForCausalLM.from_pretrained(toy.MODEL).eval()
    context = CellContext(cell_dir=tmp_path, seed=0, device="cpu", tokenizer=tokenizer, teacher=model, task_folders=[toy.TASKS])
    result = evaluate("lm_eval", model, tokenizer, context, tasks=["toy", "toy_gen"], limit=40)
    subtasks = ["toy_facts", "toy_habits", "toy_arith", "toy_seq", "toy_gen"]
    assert sorted(result.items) == sorted(subtasks) and all(len(result.items[t].ids) == 40 for t in subtasks)
    assert result.group_weighting == {"toy": "equal"}
    for task in subtasks[:4]:
        assert sum(result.items[task].metrics["acc"]) / 40 == pytest.approx(result.metrics[f"{task}/acc"])
    # The trained float model knows its world (chance is 0.25 on the 4-way tasks).
    assert result.metrics["toy/acc"] > 0.8 and result.metrics["toy_gen/exact_match"] > 0.8
    assert result.stderr["toy/acc"] > 0
