"""The torchao quantizer: the student trains, and converting it changes nothing it computes."""

from __future__ import annotations

import copy
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from qcompare.errors import QcompareError
from qcompare_plugins.torchao_quantizer import TorchaoParams, TorchaoQuantizer
from qcompare.testing import tiny_model

ARCHS = ("qwen3", "llama", "qwen2", "mistral", "gemma", "phi3")

QUANTIZER = TorchaoQuantizer()
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def teachers():
    return {arch: tiny_model(arch) for arch in ARCHS}


def fake_and_real(teacher, **params):
    """Logits of the fake-quant student and of the model converted from it."""
    p = TorchaoParams(**params)
    student = QUANTIZER.prepare(copy.deepcopy(teacher), p, None)
    with torch.no_grad():
        fake = student(IDS).logits
    real = QUANTIZER.convert(student, p, None)
    with torch.no_grad():
        return fake, real(IDS).logits, real


def weight_types(model):
    return {type(m.weight).__name__ for m in model.modules() if isinstance(m, nn.Linear)}


# --- fake quantization ≡ converted model ---------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_student_and_converted_model_give_identical_logits(teachers, arch, bits):
    # torchao's converter and its symmetric fake quantizer share choose_qparams_affine and
    # the same dequantize-then-linear arithmetic, so the promise here is bit-exactness.
    fake, real, model = fake_and_real(teachers[arch], bits=bits, group_size=32)
    assert "IntxUnpackedToInt8Tensor" in weight_types(model)
    assert torch.equal(fake, real), (fake - real).abs().max()
    with torch.no_grad():
        assert not torch.equal(fake, teachers[arch](IDS).logits)  # it did quantize


@pytest.mark.parametrize("variant", [
    dict(bits=4, symmetric=False),
    dict(bits=2, symmetric=False, group_size=0),
    dict(bits=4, group_size=0, activations="int8"),
    dict(bits=8, symmetric=False, activations="int8"),
    dict(bits=4, symmetric=False, embeddings=True),
])
@pytest.mark.parametrize("arch", ["qwen3", "phi3", "gemma"])
def test_asymmetric_per_channel_int8_activation_and_embedding_variants_match_exactly(teachers, arch, variant):
    fake, real, _ = fake_and_real(teachers[arch], **variant)
    assert torch.equal(fake, real), (fake - real).abs().max()


def test_bfloat16_student_matches_converted_exactly(teachers):
    # The converter keeps scales in the weight's dtype; the student must round with those.
    teacher = copy.deepcopy(teachers["qwen3"]).to(torch.bfloat16)
    for variant in [dict(bits=4), dict(bits=4, symmetric=False), dict(bits=3, activations="int8")]:
        fake, real, _ = fake_and_real(teacher, **variant)
        assert torch.equal(fake, real), (variant, (fake - real).abs().max())


def tinygemm_tolerance(logits: torch.Tensor) -> float:
    # The packed int4 kernel multiplies in bfloat16 in its own order, so outputs may differ by
    # a few bf16 units in the last place (2**-7 relative): measured 1-2 ulp. 4 ulp of the largest
    # logit stays far below the error of a wrong grid (>= 10% of the logits, see the test below).
    return 4 * 2.0**-7 * logits.abs().max().item()


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_int4_matches_student_to_bfloat16_rounding(teachers, arch):
    # embeddings (unpacked int4 on the same grid) ride along: they are exact, the kernel is not
    fake, real, model = fake_and_real(teachers[arch], bits=4, symmetric=False, group_size=32, packing="tinygemm",
                                      embeddings=arch == "qwen3")
    assert "Int4OpaqueTensor" in weight_types(model)
    assert fake.dtype == torch.bfloat16
    assert (fake - real).abs().max().item() <= tinygemm_tolerance(fake)


def test_stock_torchao_asymmetric_fake_quant_is_off_the_converter_grid(teachers):
    """Why prepare swaps in its own asymmetric fake quantizer: torchao 0.18's is on another grid.

    If this starts failing, torchao fixed it and the workaround can go.
    """
    from torchao.quantization import IntxWeightOnlyConfig, MappingType, PerGroup, quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    student = copy.deepcopy(teachers["qwen3"])
    only_layers = lambda m, fqn: isinstance(m, nn.Linear) and "lm_head" not in fqn  # noqa: E731
    weight = IntxFakeQuantizeConfig(torch.int4, group_size=32, is_symmetric=False)
    quantize_(student, QATConfig(weight_config=weight, step="prepare"), filter_fn=only_layers)
    with torch.no_grad():
        fake = student(IDS).logits
    base = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32), mapping_type=MappingType.ASYMMETRIC)
    quantize_(student, QATConfig(base, step="convert"), filter_fn=only_layers)
    with torch.no_grad():
        real = student(IDS).logits
    assert (fake - real).abs().max().item() > 0.1 * fake.abs().max().item()


# --- training -------------------------------------------------------------------------


@pytest.mark.parametrize("variant", [dict(bits=4), dict(bits=2, symmetric=False, activations="int8")])
def test_student_trains_and_converts_to_what_it_learned(teachers, variant):
    p = TorchaoParams(**variant)
    teacher = teachers["qwen3"]
    student = QUANTIZER.prepare(copy.deepcopy(teacher), p, None)
    latent = student.model.layers[0].mlp.down_proj.weight
    before = latent.detach().clone()
    with torch.no_grad():
        logits_before = student(IDS).logits
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    with torch.no_grad():
        target = teacher(IDS).logits.log_softmax(-1)
    loss = nn.functional.kl_div(student(IDS).logits.log_softmax(-1), target, log_target=True, reduction="batchmean")
    loss.backward()
    assert latent.grad is not None and latent.grad.abs().sum() > 0  # straight through the rounding
    opt.step()
    assert not torch.equal(latent.detach(), before)
    with torch.no_grad():
        trained = student(IDS).logits
    assert not torch.equal(trained, logits_before)
    real = QUANTIZER.convert(student, p, None)
    with torch.no_grad():
        assert torch.equal(real(IDS).logits, trained)


def test_lora_student_converts_exactly_with_adapters_kept_in_float(teachers):
    """A LoRA adapter trained beside the fake-quant layer must stay beside it: convert the
    PEFT model as it is. Merging first moves the adapter inside the quantizer: other numbers."""
    from peft import LoraConfig, get_peft_model

    p = TorchaoParams(bits=4)
    lora = LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    student = get_peft_model(QUANTIZER.prepare(copy.deepcopy(teachers["qwen3"]), p, None), lora)
    with torch.no_grad():
        trained = student(IDS).logits
        merged = QUANTIZER.convert(copy.deepcopy(student).merge_and_unload(), p, None)(IDS).logits
        real = QUANTIZER.convert(student, p, None)
        assert torch.equal(real(IDS).logits, trained)
    base = real.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(base.weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert (merged - trained).abs().max().item() > 0.01


# --- bad input ------------------------------------------------------------------------


def test_unsupported_bit_width_is_rejected_by_schema_recipe_and_prepare(teachers, monkeypatch):
    with pytest.raises(ValidationError, match="allowed: 2, 3, 4, 8"):
        TorchaoParams(bits=5)
    monkeypatch.setenv("QCOMPARE_PLUGINS", "torchao")
    from qcompare.sdk.registry import get_registry
    from qcompare.engine.recipe import expand_plugin

    errors: list[str] = []
    expand_plugin("quantizer", {"name": "torchao", "bits": [4, 5], "group_size": 48}, "quantizers[0]",
                  get_registry(), errors)
    assert any("bits" in e and "5" in e for e in errors), errors
    assert any("group_size" in e and "48" in e for e in errors), errors
    with pytest.raises(QcompareError, match=r"unsupported bits 6; allowed: 2, 3, 4, 8"):
        QUANTIZER.prepare(copy.deepcopy(teachers["qwen3"]), TorchaoParams.model_construct(bits=6), None)


def test_unsupported_group_size_names_the_allowed_ones(teachers):
    with pytest.raises(ValidationError, match=r"unsupported group_size 1; allowed: 0 \(per channel\) or 16"):
        TorchaoParams(group_size=1)
    bad = TorchaoParams().model_copy(update={"group_size": 24})
    with pytest.raises(QcompareError, match="unsupported group_size 24"):
        QUANTIZER.prepare(copy.deepcopy(teachers["qwen3"]), bad, None)


def test_group_size_that_does_not_divide_names_the_layer(teachers):
    with pytest.raises(QcompareError, match=r"group_size 128 does not divide the input features of "
                                            r"model\.layers\.0\.self_attn\.q_proj\.weight \(64\)"):
        QUANTIZER.prepare(copy.deepcopy(teachers["qwen3"]), TorchaoParams(group_size=128), None)


def test_skip_pattern_matching_nothing_warns_but_runs(teachers):
    with pytest.warns(UserWarning, match="skip pattern 'attn_out' matches no module"):
        student = QUANTIZER.prepare(copy.deepcopy(teachers["qwen3"]), TorchaoParams(skip=["lm_head", "attn_out"]), None)
    kinds = {n: type(m).__name__ for n, m in student.named_modules()}
    assert kinds["lm_head"] == "Linear" and kinds["model.layers.1.mlp.up_proj"] == "FakeQuantizedLinear"


def test_skip_globs_leave_matching_layers_in_float(teachers):
    p = TorchaoParams(skip=["lm_head", "*.mlp.*"])
    student = QUANTIZER.prepare(copy.deepcopy(teachers["llama"]), p, None)
    kinds = {n: type(m).__name__ for n, m in student.named_modules()}
    assert kinds["model.layers.0.mlp.down_proj"] == "Linear"
    assert kinds["model.layers.0.self_attn.o_proj"] == "FakeQuantizedLinear"


def test_model_without_linear_layers_is_rejected():
    model = nn.Sequential(nn.Embedding(16, 32), nn.LayerNorm(32))
    with pytest.raises(QcompareError, match=r"skip = \[\] leaves no Linear, Conv1D or 3-D expert weight"):
        QUANTIZER.prepare(model, TorchaoParams(skip=[]), None)


def test_tinygemm_rejects_combinations_its_kernel_cannot_run():
    with pytest.raises(ValidationError, match=r"packing 'tinygemm' cannot take bits=2, symmetric=true"):
        TorchaoParams(packing="tinygemm", bits=2)
    with pytest.raises(ValidationError, match="activations='int8'"):
        TorchaoParams(packing="tinygemm", symmetric=False, activations="int8")


def test_convert_needs_a_prepared_student(teachers):
    with pytest.raises(QcompareError, match="no fake-quantized Linear layers"):
        QUANTIZER.convert(copy.deepcopy(teachers["qwen3"]), TorchaoParams(), None)


# --- size -----------------------------------------------------------------------------


def test_true_size_counts_codes_at_their_width_and_scales_and_zero_points_as_stored(teachers):
    from qcompare.sdk.footprint import measure

    teacher = teachers["qwen3"]
    float_bytes = measure(teacher, teacher).memory_bytes
    linears = [m for n, m in teacher.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    n = sum(m.weight.numel() for m in linears)
    rest = float_bytes - 4 * n  # embeddings, lm_head, norms stay float32

    _, _, unpacked = fake_and_real(teacher, bits=4, group_size=32)
    held = measure(teacher, unpacked, QUANTIZER.code_bits(TorchaoParams(bits=4)))
    # one int8 per code in memory, an fp32 scale and an int8 zero point per group of 32
    assert held.memory_bytes == rest + n * (1 + 4 / 32 + 1 / 32)
    size = held.as_size(4.5)
    assert size["memory_bits_per_weight"] == pytest.approx(8 + 32 / 32 + 8 / 32)
    assert size["bits_per_weight"] == pytest.approx(4 + 32 / 32 + 8 / 32)  # codes ship at 4 bits
    assert size["nominal_bits"] == 4.5 and size["quantized_share_body"] > 0.99

    _, _, packed = fake_and_real(teacher, bits=4, symmetric=False, group_size=32, packing="tinygemm")
    shipped = measure(teacher, packed, 4)
    # two codes per byte, bf16 scale and zero per group; the rest of the model is bfloat16
    assert shipped.memory_bytes == rest // 2 + n * (0.5 + 4 / 32)
    assert shipped.as_size(5.0)["bits_per_weight"] == pytest.approx(4 + 32 / 32)
    assert shipped.memory_bytes < held.memory_bytes < float_bytes


def test_bits_per_weight_counts_scale_and_zero_point_per_group():
    bpw = QUANTIZER.bits_per_weight
    assert bpw(TorchaoParams(bits=4, group_size=32)) == 4.5
    assert bpw(TorchaoParams(bits=4, group_size=32, symmetric=False)) == 4.75
    assert bpw(TorchaoParams(bits=4, group_size=128, symmetric=False, packing="tinygemm")) == 4.25
    assert bpw(TorchaoParams(bits=2, group_size=0)) == 2.0
    assert bpw(TorchaoParams(bits=8, group_size=64)) == 8.25


def test_true_size_counts_tied_weights_once(teachers):
    from qcompare.sdk.footprint import measure

    gemma = teachers["gemma"]
    assert gemma.lm_head.weight is gemma.model.embed_tokens.weight
    measured = measure(gemma, gemma)
    assert measured.memory_bytes == sum(p.numel() * 4 for p in gemma.parameters())
    assert {w.part for w in measured.weights if "embed" in w.name} == {"embeddings"}


# --- registration ---------------------------------------------------------------------


def test_torchao_registers_through_its_entry_point(monkeypatch):
    monkeypatch.setenv("QCOMPARE_PLUGINS", "torchao")
    from qcompare.sdk.registry import get_registry

    assert get_registry().get("quantizer", "torchao") is TorchaoQuantizer


# --- the toy model --------------------------------------------------------------------


def test_toy_model_student_equals_converted_and_int2_hurts_more_than_int4(monkeypatch):
    import qcompare_plugins.toy
    from transformers import AutoModelForCausalLM

    if not (Path(qcompare_plugins.toy.__file__).parent / "model" / "config.json").exists():
        pytest.skip("the toy model (plugins/toy/model) is not built yet")
    monkeypatch.delenv("QCOMPARE_PLUGINS", raising=False)
    from qcompare.sdk.registry import get_registry

    folder = get_registry().models["toy-qwen3"].obj[0]
    teacher = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(3, teacher.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        t = teacher(ids).logits.log_softmax(-1)
    kl = {}
    for label, params in {"int4": dict(bits=4, group_size=32), "int2": dict(bits=2, group_size=0)}.items():
        p = TorchaoParams(**params)
        student = QUANTIZER.prepare(copy.deepcopy(teacher), p, None)
        with torch.no_grad():
            fake = student(ids).logits
            real = QUANTIZER.convert(student, p, None)(ids).logits
        assert torch.equal(fake, real), label
        kl[label] = (t.exp() * (t - real.log_softmax(-1))).sum(-1).mean().item()
    assert 0 < kl["int4"] < kl["int2"]
