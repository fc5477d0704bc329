"""checks.FunctionWatch: a transformation before rounding (AWQ's smoothing, a rotation) must leave the float
model's function as it was; one that rescales an output some reader of it does not compensate fails,
naming the first module that moved."""

from __future__ import annotations

import copy

import pytest
import torch

from qcompare.sdk import checks
from qcompare.testing import tiny_model


def smooth(model, readers, layer: int = 0):
    """AWQ's smoothing by hand: the MLP's norm divided by per-channel scales, ``readers`` of it multiplied."""
    block = model.model.layers[layer]
    s = torch.linspace(0.5, 2.0, block.post_attention_layernorm.weight.numel())
    with torch.no_grad():
        block.post_attention_layernorm.weight.div_(s)
        for name in readers:
            block.mlp.get_submodule(name).weight.mul_(s)
    return f"model.layers.{layer}.post_attention_layernorm"


def test_a_smoothing_whose_readers_are_all_balanced_keeps_the_function():
    model = tiny_model("qwen3")
    watch = checks.FunctionWatch(model)
    norm = smooth(model, ["gate_proj", "up_proj"])
    check = watch.verdict(model, checks.dtype_tolerance(model), "the smoothing", may_change=[norm])
    assert check["passed"] and check["max_rel_diff"] < 1e-5 and check["modules"] > 20 and not check["moved"]


def test_a_reader_left_unscaled_fails_naming_it_first():
    model = tiny_model("qwen3")
    watch = checks.FunctionWatch(copy.deepcopy(model))
    norm = smooth(model, ["gate_proj"])  # up_proj reads the smoothed norm too, and is left as it was
    with pytest.raises(checks.CheckFailed, match=r"^the smoothing changed what the float model computes before any "
                                                 r"rounding: model\.layers\.0\.mlp\.up_proj's output moves by") as e:
        watch.verdict(model, checks.dtype_tolerance(model), "the smoothing", may_change=[norm])
    assert e.value.name == "transform" and not e.value.check["passed"]
    moved = [m["module"] for m in e.value.check["moved"]]
    assert moved[:3] == ["model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj", "model.layers.0.mlp"]
    assert "model.layers.0.mlp.gate_proj" not in moved  # balanced: its output is what it was


def test_a_smoothing_layer_moves_only_where_the_transform_says_it_may():
    model = tiny_model("qwen3")
    watch = checks.FunctionWatch(model)
    smooth(model, ["gate_proj", "up_proj"])
    with pytest.raises(checks.CheckFailed, match=r"model\.layers\.0\.post_attention_layernorm's output moves"):
        watch.verdict(model, checks.dtype_tolerance(model), "the smoothing")
