"""The tests' fixtures, in one place: pytest fixtures here, the test plugins and data files in
fixtures/, and the tiny models and chat world in ``qcompare.testing`` (the ones plugin authors use)."""

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

# the test plugins and data files (tests/fixtures/) import by name, as an installed plugin would
sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))

import pytest  # noqa: E402
import testplugins  # noqa: E402
from qcompare.sdk import add_plugin, remove_plugin
from qcompare.testing import save_tiny_model

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_RTN = ROOT / "examples" / "qcompare-rtn"
EXAMPLE_NF3 = ROOT / "examples" / "qcompare-nf3"


def pytest_collection_modifyitems(items):
    """Modules with whole runs first, the matrix before them: two workers then end on short tests together
    instead of one of them running a long one alone. A module's tests stay together (its fixtures are made once)."""
    def weight(item):
        marks = {m.name for m in item.iter_markers()}
        return 0 if "slow" in marks else 1 if "e2e" in marks else 2

    rank: dict = {}
    for item in items:
        rank[item.module] = min(rank.get(item.module, 2), weight(item))
    items.sort(key=lambda item: rank[item.module])


def build_tiny_model(folder: Path) -> Path:
    """A random Qwen3 (hidden 32) and the tiny chat world's tokenizer, saved as a Hugging Face folder."""
    return save_tiny_model(folder, vocab_size=64, hidden_size=32, intermediate_size=64, head_dim=8,
                           max_position_embeddings=64)


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
