"""Memory known before the run: `plan` estimates each cell's peak on its device from the model's
config and the distiller's parameters, and says which recipe change would make a cell fit."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from qcompare.cli import app
from qcompare.engine.estimate import Estimate
from qcompare.engine.memory import (ACTIVATION_FACTOR, GIB, JSD_LOSS_TENSORS, Shapes, cell_memory, fixes,
                             lora_parameters)
from qcompare_plugins.distillers.gkd import GKDParams

cli = CliRunner()

# Qwen/Qwen3-4B-Instruct-2507's config.json, the fields that set memory
QWEN3_4B = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 2560,
            "intermediate_size": 9728, "num_hidden_layers": 36, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": True,
            "max_position_embeddings": 40960, "rope_theta": 5000000, "rms_norm_eps": 1e-6}
N = 4_022_468_096
M = Shapes.from_config(QWEN3_4B, N)


def test_full_fine_tuning_of_qwen3_4b_adds_up_by_hand():
    assert M == Shapes(N, 2560, 36, 151936, 9728, 32, 8, 128, True)
    p = GKDParams(per_device_train_batch_size=8, max_length=384, lmbda=0.0, loss_kernel="full")
    mem = cell_memory(M, p, device="cuda")
    tokens = 8 * 384
    per_token_layer = 4 * 2560 + 2 * 32 * 128 + 2 * 8 * 128 + 4 * 9728  # = 59392 values
    assert mem.parts == pytest.approx({
        "teacher weights": 2 * N,  # bf16
        "student weights": 0,  # replaced by the fp32 masters
        "fp32 master weights": 4 * N,
        "gradients": 4 * N,  # of the fp32 masters
        "optimizer states": 8 * N,  # AdamW: two fp32 per parameter
        "rounded weights": 2 * (N - 151936 * 2560),  # every Linear's fake-quantized weight, bf16
        "activations": 36 * ACTIVATION_FACTOR * per_token_layer * tokens * 2,
        "loss": JSD_LOSS_TENSORS * 4 * tokens * 151936,  # full-vocabulary JSD
    })
    assert mem.peak == pytest.approx(sum(mem.parts.values()) * 1.05 + GIB)
    assert 90 * GIB < mem.peak < 140 * GIB

    checkpointed = cell_memory(M, p.model_copy(update={"gradient_checkpointing": True}))
    assert checkpointed.parts["activations"] == pytest.approx(
        2 * 36 * 2560 * tokens * 2 + ACTIVATION_FACTOR * per_token_layer * tokens * 2)
    assert checkpointed.parts["rounded weights"] == pytest.approx(mem.parts["rounded weights"] / 36)

    on_policy = cell_memory(M, p.model_copy(update={"lmbda": 0.5, "max_new_tokens": 128}))
    kv_cache = 2 * 36 * 8 * 128 * 8 * (384 + 128) * 2
    assert on_policy.parts["rollouts"] == pytest.approx(2 * N + kv_cache)

    # the tiled loss (the default) holds two fp32 tiles and the fp32 gradients of the head and the hidden states
    tiled = cell_memory(M, p.model_copy(update={"loss_kernel": "chunked"}))
    assert tiled.parts["loss"] == 4 * (2 * 3072 * 32768 + 151936 * 2560 + tokens * 2560)
    assert tiled.parts["loss"] < mem.parts["loss"] / 10

    cpu = cell_memory(M, p, device="cpu")  # float32: the model's weights are the masters
    assert cpu.parts["teacher weights"] == cpu.parts["student weights"] == 4 * N
    assert "fp32 master weights" not in cpu.parts


def test_a_lora_cell_needs_far_less_than_full_fine_tuning():
    full = cell_memory(M, GKDParams(per_device_train_batch_size=1, max_length=512, lmbda=0.0))
    lora_p = GKDParams(per_device_train_batch_size=1, max_length=512, lmbda=0.0, lora_r=16)
    shared = cell_memory(M, lora_p, shares_weights=True)  # torchao student over the teacher's weights
    separate = cell_memory(M, lora_p, shares_weights=False)
    adapters = lora_parameters(M, 16)
    assert adapters == 16 * 36 * ((2560 + 4096) * 2 + (2560 + 1024) * 2 + (2560 + 9728) * 3)
    assert shared.parts["optimizer states"] == 8 * adapters and shared.parts["gradients"] == 4 * adapters
    assert separate.peak - shared.peak == pytest.approx(1.05 * 2 * N)
    assert shared.peak < separate.peak < full.peak / 2 and shared.peak < full.peak / 3


def test_the_fixes_each_make_the_cell_fit():
    p = GKDParams(per_device_train_batch_size=8, max_length=1024, gradient_accumulation_steps=2)
    capacity = 0.9 * cell_memory(M, p).peak
    tries = fixes(M, p, capacity, lora_shares=True)
    assert tries[0] == "lora_r = 16"
    assert any(t.startswith("per_device_train_batch_size = ") and "gradient_accumulation_steps" in t for t in tries)
    for t in tries:
        if t.startswith("per_device_train_batch_size"):
            b, g = int(t.split()[2]), int(t.split()[-1])
            assert b * g == 16 and cell_memory(M, p.model_copy(update={"per_device_train_batch_size": b})).peak <= capacity
    q = GKDParams(per_device_train_batch_size=1, max_length=256)
    assert 'optimizer = "adamw_8bit"' in fixes(M, q, cell_memory(M, q).peak - 10 * GIB)
    eight = cell_memory(M, q.model_copy(update={"optimizer": "adamw_8bit"}))
    assert eight.parts["optimizer states"] == 2 * N


def test_the_estimate_record_keeps_the_memory():
    mem = cell_memory(M, GKDParams())
    record = Estimate(1.0, 2.0, "cuda", "assumed", memory=mem).as_record()
    assert record["memory"]["peak_bytes"] == int(mem.peak) and "activations" in record["memory"]["parts"]
    assert json.loads(json.dumps(record)) == record


RECIPE = """
name = "sized"
models = ["{model}"]
seeds = [0]

[data]
train = "toy-chat"

[[quantizers]]
name = "torchao"
bits = 4

[[distillers]]
name = "gkd"
lmbda = 0.0
per_device_train_batch_size = {batch}
max_length = 1024
lora_r = {lora_r}

[[evaluators]]
name = "lm_eval"
tasks = ["toy_arith"]
"""


@pytest.fixture
def sized(monkeypatch, tmp_path):
    monkeypatch.setenv("QCOMPARE_PLUGINS", "local,toy,torchao,distillers,evaluators")
    model = tmp_path / "qwen3-4b-config"  # the config only: plan reads no weights
    model.mkdir()
    (model / "config.json").write_text(json.dumps(QWEN3_4B))

    def write(batch: int, lora_r: int):
        recipe = tmp_path / f"sized_{batch}_{lora_r}.toml"
        recipe.write_text(RECIPE.format(model=model, batch=batch, lora_r=lora_r))
        return recipe

    return write


def test_plan_says_which_cell_will_not_fit_and_what_would(sized, tmp_path):
    res = cli.invoke(app, ["plan", str(sized(8, 0)), "-o", str(tmp_path / "run"), "--device", "cuda",
                           "--gpu-memory", "80"])
    assert res.exit_code == 0, res.output
    assert "a 80 GiB GPU" in res.output
    line = next(x for x in res.output.splitlines() if "will not fit" in x)
    assert "of 80; try: lora_r = 16" in line and ("per_device_train_batch_size = " in line or "gradient_checkpointing = true" in line)

    res = cli.invoke(app, ["plan", str(sized(1, 16)), "-o", str(tmp_path / "run"), "--device", "cuda",
                           "--gpu-memory", "80"])
    assert res.exit_code == 0, res.output
    assert "peak memory per cell" in res.output and "will not fit" not in res.output
