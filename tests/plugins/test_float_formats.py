"""The float formats (NVFP4, MXFP4, FP8 through torchao; NF4/FP4 through bitsandbytes): the student
rounds on exactly the converter's grid, the converted model computes what the student computed,
the export reloads to it, and the sizes count every block scale."""

from __future__ import annotations

import copy
import math
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from qcompare.sdk import checks, footprint
from qcompare.errors import QcompareError
from qcompare.testing import check_quantizer, tiny_config, tiny_model
from qcompare_plugins.float_formats import (BnbParams, BnbQuantizer, FP8Params, FP8Quantizer, MXFP4Quantizer,
                                            NVFP4Quantizer)
from qcompare_plugins.float_grids import FloatFakeQuantizer

pytestmark = pytest.mark.e2e  # runs whole cells, runs or commands (not in the fast subset)

QUANTIZERS = {q.name: q for q in (NVFP4Quantizer, MXFP4Quantizer, FP8Quantizer, BnbQuantizer)}


@pytest.mark.parametrize("name, params, layouts, refuse", [
    ("nvfp4", {}, ("gqa", "fused-qkv", "tied-embeddings"), ("moe-experts", "conv1d")),
    ("nvfp4", {"per_tensor_scale": False}, ("gqa",), ()),
    ("mxfp4", {}, ("gqa", "tied-embeddings"), ("conv1d",)),
    ("fp8", {}, ("gqa", "fused-qkv"), ("moe-experts",)),
    ("fp8", {"dtype": "e5m2", "group_size": 32}, ("gqa",), ()),
    ("fp8", {"granularity": "tensor"}, ("tied-embeddings",), ()),
    ("bnb", {}, ("gqa", "tied-embeddings", "conv1d"), ("moe-experts",)),
    ("bnb", {"quant_type": "fp4", "double_quant": False, "blocksize": 128}, ("gqa", "conv1d"), ()),
], ids=lambda v: str(v) if not isinstance(v, tuple) else "-".join(v) or "none")
def test_each_format_passes_the_runners_checks(name, params, layouts, refuse, tmp_path):
    # gradients reach the float weights; converted ≡ trained student to the bit; coverage; the
    # saved folder reloads, in a fresh process as its model card says, to the same logits
    results = check_quantizer(QUANTIZERS[name], params, layouts=layouts, refuse=refuse, folder=tmp_path)
    for layout in layouts:
        assert results[layout]["fake_vs_converted"]["max_abs_diff"] == 0.0
        assert results[layout]["reload"]["max_abs_diff"] == 0.0
        assert results[layout]["size"]["quantized_share_body"] > 0.98
    for layout in refuse:
        assert "\n" not in results[layout]["refused"] and name in results[layout]["refused"]


def _bf16(model):
    from qcompare_plugins.torchao_grids import cast_weights

    return cast_weights(model, torch.bfloat16)


@pytest.mark.parametrize("name", ["nvfp4", "mxfp4", "fp8", "bnb"])
def test_bfloat16_layers_with_bias_convert_exactly(name):
    # GPT-NeoX's layers carry biases; torchao's FP8 weight-only layer computes x @ W.T + b, which
    # in bfloat16 rounds differently from F.linear: the student must multiply in the same order
    quantizer = QUANTIZERS[name]()
    params = quantizer.Params()
    teacher = _bf16(tiny_model("gpt_neox"))
    with torch.no_grad():  # transformers initialises biases to zero; trained ones are not
        for m in teacher.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 0.1)
    student = quantizer.prepare(copy.deepcopy(teacher), params, None)
    assert student.gpt_neox.layers[0].attention.query_key_value.bias.dtype == torch.bfloat16
    fake = checks.probe_logits(student)
    real = checks.probe_logits(quantizer.convert(student, params, None))
    assert torch.equal(fake, real)


def _stored_weight(layer):
    """What the converted layer stores, read back in the weight's dtype with the library's own call."""
    w = layer.weight
    if getattr(w, "quant_state", None) is not None:
        import bitsandbytes.functional as bf

        return bf.dequantize_4bit(w.data, w.quant_state)
    return w.dequantize(torch.float32) if type(w).__name__ != "Float8Tensor" else w.dequantize()


@pytest.mark.parametrize("name, params", [("nvfp4", {}), ("mxfp4", {}), ("fp8", {"group_size": 32}),
                                          ("bnb", {"quant_type": "fp4"})])
def test_the_student_rounds_onto_the_converted_grid(name, params):
    quantizer = QUANTIZERS[name]()
    p = quantizer.Params(**params)
    student = quantizer.prepare(tiny_model("qwen3"), p, None)
    layer = student.model.layers[0].mlp.down_proj
    with torch.no_grad():
        layer.weight.add_(0.01 * torch.randn_like(layer.weight))  # as training moves it
        seen = layer.weight_fake_quantizer(layer.weight).float()
    converted = quantizer.convert(student, p, None).model.layers[0].mlp.down_proj
    assert torch.equal(_stored_weight(converted).float(), seen)
    assert not torch.equal(seen, layer.weight.float())  # it did round


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(32, 32), (16, 48), (24, 96)], ids=str)
def test_blocks_that_span_rows_come_back_as_they_were_quantized(quant_type, shape):
    """bitsandbytes cuts its blocks from the flattened weight; its CPU dequantize kernel read a block
    per row, so a layer narrower than a block (or not a multiple of it) came back 0.2–0.8 off, and
    student, converted model and reload agreed on the wrong weights. Each block must come back as
    its absmax times its codes."""
    import bitsandbytes.functional as bf

    import qcompare.compat  # noqa: F401  (what converted layers and reloads run with)

    torch.manual_seed(0)
    w = torch.randn(shape) * torch.rand(shape[0], 1) * 3  # rows of different scales
    packed, state = bf.quantize_4bit(w, blocksize=64, quant_type=quant_type)
    got = bf.dequantize_4bit(packed, state)
    codes = torch.stack([packed.flatten() >> 4, packed.flatten() & 0xF], 1).flatten().long()[: w.numel()]
    table = bf.get_4bit_type(quant_type, device="cpu")
    blocks = torch.nn.functional.pad(table[codes], (0, -w.numel() % 64)).reshape(-1, 64)
    want = (blocks * state.absmax[:, None]).flatten()[: w.numel()].reshape(shape)
    assert torch.equal(got, want)
    assert (got - w).norm() / w.norm() < 0.15  # what 4 bits with a scale per 64 weights make


def test_gradients_pass_straight_through_to_the_exact_rounded_weight():
    import bitsandbytes.functional as bf

    def fp4(w):
        return bf.dequantize_4bit(*bf.quantize_4bit(w, blocksize=64, quant_type="fp4"))

    w = torch.randn(64, 64, dtype=torch.float32) * 0.02
    w[0, 0] = 0.7  # an outlier widens its block's steps, as in real weights
    w.requires_grad_(True)
    quantizer = FloatFakeQuantizer(fp4, "FP4")
    out = quantizer(w)
    # the additive form w + (ŵ − w).detach() misses ŵ on about one FP4 weight in ten
    assert torch.equal(out, fp4(w.detach()))
    upstream = torch.randn_like(w)
    out.backward(upstream)
    assert torch.equal(w.grad, upstream)
    quantizer.enabled = False
    assert quantizer(w) is w


@pytest.mark.parametrize("name", ["nvfp4", "bnb"])
def test_a_weight_sharing_student_runs_as_its_teacher_with_quantizers_off(name):
    from qcompare.sdk import fake_quantizers
    from qcompare_plugins.distillers.shared_teacher import teacher_mode

    quantizer = QUANTIZERS[name]()
    teacher = tiny_model("qwen3")
    student = quantizer.prepare(copy.copy(teacher), quantizer.Params(), None)  # the teacher's own Parameters
    assert fake_quantizers(student)
    with teacher_mode(student):
        as_teacher = checks.probe_logits(student)
    assert torch.equal(as_teacher, checks.probe_logits(tiny_model("qwen3")))
    assert not torch.equal(checks.probe_logits(student), as_teacher)


def _meta_model(family, **overrides):
    from transformers import AutoModelForCausalLM

    config = tiny_config(family)
    for k, v in overrides.items():
        setattr(config, k, v)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("name, overrides, words", [
    ("nvfp4", {"intermediate_size": 40}, ["mlp.gate_proj", "40×64", "16"]),
    ("mxfp4", {"intermediate_size": 48}, ["mlp.down_proj", "48", "32"]),
    ("fp8", {"intermediate_size": 48}, ["group_size 32", "48"]),
])
def test_shapes_a_format_cannot_tile_are_refused_before_a_cell_starts(name, overrides, words):
    quantizer = QUANTIZERS[name]()
    params = quantizer.Params(**({"group_size": 32} if name == "fp8" else {}))
    with pytest.raises(QcompareError) as e:
        quantizer.check_model(_meta_model("qwen3", **overrides), params)
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_fused_experts_and_linear_subclasses_are_refused_with_what_to_do():
    with pytest.raises(QcompareError, match=r"fused in 3-D weights.*torchao quantizer.*\*\.experts"):
        BnbQuantizer().check_model(_meta_model("qwen3_moe"), BnbParams())
    with pytest.raises(QcompareError, match="FalconLinear.*not load as Linear4bit"):
        BnbQuantizer().check_model(_meta_model("falcon"), BnbParams())
    # leaving the experts in float is allowed; the runner's coverage check then decides
    BnbQuantizer().check_model(_meta_model("qwen3_moe"), BnbParams(skip=["lm_head", "*.experts"]))


def test_parameters_name_what_is_allowed():
    with pytest.raises(ValidationError, match="32, 64, 128, 256"):
        BnbParams(blocksize=48)
    with pytest.raises(ValidationError, match="granularity 'tensor' takes whole tensors"):
        FP8Params(granularity="tensor", group_size=32)
    with pytest.raises(ValidationError, match="nf4"):
        BnbParams(quant_type="int4")


def _expected_bits(name, params, out_f, in_f) -> float:
    """Bits a format's definition stores for one out_f × in_f weight (scale tiles padded as stored)."""
    n = out_f * in_f
    pad = lambda x, m: math.ceil(x / m) * m  # noqa: E731
    if name == "nvfp4":  # E2M1 codes, an E4M3 scale per 16 in 128 × 4 tiles, a float32 per tensor
        return 4 * n + 8 * pad(out_f, 128) * pad(in_f // 16, 4) + 32 * params.per_tensor_scale
    if name == "mxfp4":  # E2M1 codes, an E8M0 scale per 32 in 128 × 4 tiles
        return 4 * n + 8 * pad(out_f, 128) * pad(in_f // 32, 4)
    if name == "fp8":  # 8-bit codes, a float32 scale per row
        return 8 * n + 32 * out_f
    blocks = math.ceil(n / params.blocksize)  # bnb: codes, absmax per block, the 16-entry code table
    if not params.double_quant:
        return 4 * n + 32 * blocks + 16 * 32
    # 8-bit absmax codes, a float32 scale per 256 of them, their 256-entry table, the offset
    return 4 * n + 8 * blocks + 32 * math.ceil(blocks / 256) + 256 * 32 + 32 + 16 * 32


@pytest.mark.parametrize("name, params", [("nvfp4", {}), ("mxfp4", {}), ("fp8", {}), ("bnb", {}),
                                          ("bnb", {"double_quant": False, "blocksize": 128})])
def test_true_bits_count_every_block_scale(name, params):
    quantizer = QUANTIZERS[name]()
    p = quantizer.Params(**params)
    teacher = tiny_model("qwen3")
    model = quantizer.convert(quantizer.prepare(copy.deepcopy(teacher), p, None), p, None)
    measured = footprint.measure(teacher, model, quantizer.code_bits(p))
    shapes = {n: tuple(m.weight.shape) for n, m in teacher.named_modules() if isinstance(m, nn.Linear)}
    quantized = [w for w in measured.weights if w.quantized]
    assert quantized
    for w in quantized:
        assert w.bits == _expected_bits(name, p, *shapes[w.name.removesuffix(".weight")]), w.name
    size = measured.as_size(quantizer.bits_per_weight(p))
    assert size["bits_per_weight"] >= size["nominal_bits"]  # what is stored is never less than the format's name


def test_the_pareto_front_keeps_what_no_other_point_beats():
    from qcompare.reports.figures import pareto_front

    points = [(4.25, 0.90), (4.5, 0.95), (5.25, 0.94), (5.25, 0.97), (8.4, 0.97), (4.5, 0.93)]
    assert pareto_front(points) == [(4.25, 0.90), (4.5, 0.95), (5.25, 0.97)]
