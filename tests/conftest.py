"""Shared fixtures: a tiny loadable model, the example RTN plugin, and small test plugins."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# validate's structure cache: one per test session, never the user's
os.environ.setdefault("QCOMPARE_CACHE", tempfile.mkdtemp(prefix="qcompare-test-cache-"))

import pytest
import torch
import testplugins
from qcompare.sdk.registry import add_plugin, remove_plugin

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_RTN = ROOT / "examples" / "qcompare-rtn"
EXAMPLE_NF3 = ROOT / "examples" / "qcompare-nf3"


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


@pytest.fixture
def test_plugins(monkeypatch):
    """The example RTN quantizer and the test distiller/evaluator, registered for one test.

    Entry points are limited to the built-in local executor, so core tests don't depend
    on the heavier built-in plugins.
    """
    monkeypatch.setenv("QCOMPARE_PLUGINS", "local")
    monkeypatch.syspath_prepend(str(EXAMPLE_RTN))
    import qcompare_rtn

    plugins = [qcompare_rtn, testplugins]
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
max_steps = 2

[[evaluators]]
name = "probe"
"""
