"""Shared fixtures: a tiny loadable model, the example RTN plugin, and small test plugins."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from pydantic import Field

from qcompare import hookimpl
from qcompare.api import Distiller, DistillResult, EvalResult, Evaluator, Params
from qcompare.plugins import add_plugin, remove_plugin

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_RTN = ROOT / "examples" / "qcompare-rtn"


def build_tiny_model(folder: Path, vocab: int = 64) -> Path:
    """A random Qwen3 and a word-level tokenizer, saved as a Hugging Face folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(vocab - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                         tie_word_embeddings=False, pad_token_id=0, eos_token_id=1)
    Qwen3ForCausalLM(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen3"))


class NudgeParams(Params):
    steps: int = Field(2, ge=0, description="SGD steps")
    learning_rate: float = Field(1e-2, gt=0, description="step size")
    fail: bool = Field(False, description="raise inside the cell (tests failure handling)")
    sleep: float = Field(0.0, ge=0, description="seconds to wait per step (tests interruption)")


class Nudge(Distiller):
    """Test distiller: a few SGD steps of KL(teacher‖student) on seeded random tokens."""

    name = "nudge"
    Params = NudgeParams

    def distill(self, teacher, student, tokenizer, data, params, context):
        if params.fail:
            raise RuntimeError("nudge was asked to fail")
        gen = torch.Generator().manual_seed(context.seed or 0)
        opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=params.learning_rate)
        log = []
        student.train()
        with context.progress.task("nudge", total=params.steps) as advance:
            for step in range(params.steps):
                ids = torch.randint(3, teacher.config.vocab_size, (2, 8), generator=gen)
                with torch.no_grad():
                    t = teacher(ids).logits.log_softmax(-1)
                s = student(ids).logits.log_softmax(-1)
                loss = torch.nn.functional.kl_div(s, t, log_target=True, reduction="batchmean")
                opt.zero_grad()
                loss.backward()
                opt.step()
                log.append({"step": step + 1, "loss": loss.item()})
                time.sleep(params.sleep)
                advance(1)
        student.eval()
        return DistillResult(student, log, {"train_steps": params.steps})


class Keep(Distiller):
    """Test distiller: no training (the result cannot depend on the seed)."""

    name = "keep"
    seeded = False

    def distill(self, teacher, student, tokenizer, data, params, context):
        return DistillResult(student)


class ProbeParams(Params):
    sequences: int = Field(4, gt=0, description="random sequences scored")


class Probe(Evaluator):
    """Test evaluator: KL to the teacher and top-1 agreement on fixed random tokens."""

    name = "probe"
    Params = ProbeParams

    def evaluate(self, model, tokenizer, params, context):
        ids = torch.randint(3, context.teacher.config.vocab_size, (params.sequences, 8),
                            generator=torch.Generator().manual_seed(1234))
        with torch.no_grad():
            t = context.teacher(ids).logits.float().log_softmax(-1)
            s = model(ids).logits.float().log_softmax(-1)
        kl = (t.exp() * (t - s)).sum(-1).mean(-1)
        agree = (t.argmax(-1) == s.argmax(-1)).float().mean(-1)
        return EvalResult(metrics={"probe/kl": kl.mean().item(), "probe/agree": agree.mean().item()},
                          items={"probe": agree.tolist()})


class TestPlugins:
    @hookimpl
    def register_distillers(self, register):
        register(Nudge)
        register(Keep)

    @hookimpl
    def register_evaluators(self, register):
        register(Probe)


@pytest.fixture
def test_plugins(monkeypatch):
    """The example RTN quantizer and the test distiller/evaluator, registered for one test.

    Entry points are limited to the built-in local executor, so core tests don't depend
    on the heavier built-in plugins.
    """
    monkeypatch.setenv("QCOMPARE_PLUGINS", "local")
    monkeypatch.syspath_prepend(str(EXAMPLE_RTN))
    import qcompare_rtn

    plugins = [qcompare_rtn, TestPlugins()]
    for p in plugins:
        add_plugin(p)
    yield plugins
    for p in plugins:
        remove_plugin(p)
    sys.modules.pop("qcompare_rtn", None)


@pytest.fixture
def write_recipe(tmp_path, tiny_model_dir):
    """Write a recipe over the tiny model; ``body`` may use {model}."""

    def write(body: str, name: str = "recipe.toml") -> Path:
        path = tmp_path / name
        path.write_text(body.replace("{model}", str(tiny_model_dir)))
        return path

    return write


BASIC = """
name = "basic"
models = ["{model}"]
seeds = [0, 1]

[[quantizers]]
name = "rtn"
bits = [8, 2]
group_size = 16

[[distillers]]
name = "keep"

[[distillers]]
name = "nudge"
steps = 2

[[evaluators]]
name = "probe"
"""
