"""On-policy rollouts from ``RolloutEngine``: an inference copy of the student holding its rounded
weights, generating with transformers' static KV cache on bucketed prompts, returns what TRL's
``generate_on_policy_outputs`` returns for the training student (inside ``weights_rounded_once``):
the same ids, mask and labels, greedy and sampled, after optimizer steps, with LoRA, int8
activations and fused experts."""

from __future__ import annotations

import copy
import warnings
from unittest import mock

import pytest
import torch
from transformers import GenerationConfig

from qcompare.sdk.registry import get_registry
from qcompare.testing import tiny_teacher, tiny_tokenizer
from qcompare_plugins.distillers.gkd_trainer import no_router_loss
from qcompare_plugins.distillers.rollouts import RolloutEngine, weights_rounded_once

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from trl.experimental.gkd import GKDTrainer

QUESTIONS = [(1, 2), (13, 4), (7, 7)]


def tiny_student(quantizer="torchao", **params):
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "left"
    cls = get_registry().get("quantizer", quantizer)
    params = params or (dict(bits=4, group_size=32) if quantizer == "torchao" else {})
    return tokenizer, cls().prepare(copy.deepcopy(tiny_teacher()), cls.Params(**params), None).train()


def prompts(tokenizer, questions=QUESTIONS, lead=("", "maybe ", "")):
    """TRL's collator's prompt columns: left-padded, of different lengths within the batch."""
    text = [f"<|user|> {w}what is {a} plus {b} <|end|> <|assistant|>" for w, (a, b) in zip(lead, questions)]
    enc = tokenizer(text, return_tensors="pt", padding=True)
    return {"prompts": enc.input_ids, "prompt_attention_mask": enc.attention_mask}


def gkd_config(tokenizer, sample: bool, new: int = 12):
    """What TRL's GKDTrainer builds (temperature 0.9 is GKDConfig's default), greedy or sampled."""
    return GenerationConfig(max_new_tokens=new, do_sample=sample, temperature=0.9 if sample else 1.0, top_k=0,
                            top_p=1.0, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)


def todays_path(student, inputs, config, seed=0):
    torch.manual_seed(seed)
    with weights_rounded_once(student):
        return GKDTrainer.generate_on_policy_outputs(student, inputs, config)


def engine_path(engine, inputs, config, seed=0):
    torch.manual_seed(seed)
    return engine.generate(inputs, config)


def assert_same(a, b):
    assert all(torch.equal(x, y) for x, y in zip(a, b)), (a[0], b[0])


@pytest.mark.parametrize("quantizer, params", [("torchao", dict(bits=4, group_size=32)),
                                               ("torchao", dict(bits=4, group_size=32, activations="int8")),
                                               ("torchao", dict(bits=4, group_size=32, embeddings=True)),
                                               ("bnb", {}), ("nvfp4", {})])
def test_greedy_rollouts_equal_the_training_students_through_a_static_cache(quantizer, params):
    tokenizer, student = tiny_student(quantizer, **params)
    inputs, config = prompts(tokenizer), gkd_config(tokenizer, sample=False)
    engine = RolloutEngine.for_student(student, bucket=8)
    caches = []
    prepare = engine.model._prepare_static_cache
    with mock.patch.object(engine.model, "_prepare_static_cache", lambda *a, **k: caches.append(1) or prepare(*a, **k)):
        fast = engine.generate(inputs, config)
    assert inputs["prompts"].shape[1] % 8 != 0  # the bucket pads, and the padding is stripped again
    assert_same(todays_path(student, inputs, config), fast)
    assert caches and not engine.compiled  # the static-cache path, uncompiled on CPU
    with torch.no_grad():  # not only the argmax: every logit (int8 activations move few tokens)
        assert torch.equal(engine.model(fast[0], attention_mask=fast[1]).logits,
                           student(fast[0], attention_mask=fast[1]).logits)
    assert fast[0].shape[1] > inputs["prompts"].shape[1] and (fast[2][:, :inputs["prompts"].shape[1]] == -100).all()


def test_sampled_rollouts_draw_the_same_tokens_for_the_same_seed():
    tokenizer, student = tiny_student()
    inputs, config = prompts(tokenizer), gkd_config(tokenizer, sample=True)
    engine = RolloutEngine.for_student(student, bucket=16)
    for seed in range(4):
        assert_same(todays_path(student, inputs, config, seed), engine_path(engine, inputs, config, seed))
    assert not torch.equal(engine_path(engine, inputs, config, 0)[0], engine_path(engine, inputs, config, 1)[0])


def test_refresh_rounds_again_only_after_the_students_weights_change():
    tokenizer, student = tiny_student()
    inputs, config = prompts(tokenizer), gkd_config(tokenizer, sample=False)
    engine = RolloutEngine.for_student(student, bucket=8)
    before = engine.generate(inputs, config)
    quantizer_cls = type(student.model.layers[0].self_attn.q_proj.weight_fake_quantizer)
    with mock.patch.object(quantizer_cls, "forward", autospec=True, side_effect=quantizer_cls.forward) as rounding:
        engine.generate(inputs, config)
        assert rounding.call_count == 0  # nothing changed: the copy's weights are current
        with torch.no_grad():  # an optimizer step: in place, the version counters move
            for p in student.parameters():
                p.add_(torch.randn_like(p), alpha=0.05)
        stepped = engine.generate(inputs, config)
        assert 0 < rounding.call_count <= len(list(student.modules()))
    assert not torch.equal(stepped[0], before[0])
    assert_same(todays_path(student, inputs, config), stepped)
    # a write through .data bypasses the version counter: refresh(force=True) is told
    with torch.no_grad():
        down = student.model.layers[0].mlp.down_proj.weight
        down.data.copy_(torch.randn_like(down))
        student.model.norm.weight.data.mul_(1.5)  # aliased: seen without any refresh
    engine.refresh(force=True)
    assert_same(todays_path(student, inputs, config), engine.generate(inputs, config))


def test_a_lora_student_keeps_its_adapters_over_the_students_own_storage():
    from peft import LoraConfig, get_peft_model

    tokenizer, student = tiny_student()
    student = get_peft_model(student, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                 target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():  # a trained adapter: B away from its zero init
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    inputs = prompts(tokenizer)
    engine = RolloutEngine.for_student(student, bucket=8)
    student_adapters = {n: p for n, p in student.get_base_model().named_parameters() if "lora_" in n}
    copy_adapters = dict(engine.model.named_parameters())
    assert student_adapters and all(copy_adapters[n].data_ptr() == p.data_ptr() for n, p in student_adapters.items())
    for sample in (False, True):
        config = gkd_config(tokenizer, sample)
        assert_same(todays_path(student, inputs, config), engine_path(engine, inputs, config))
    with torch.no_grad():
        for p in student_adapters.values():
            p.mul_(-1.0)
    assert_same(todays_path(student, inputs, config), engine_path(engine, inputs, config))


def test_fused_moe_experts_are_held_rounded_in_their_own_class():
    from qcompare.testing import tiny_model
    from qcompare_plugins.torchao_quantizer import TorchaoParams, TorchaoQuantizer

    params = TorchaoParams(bits=2, group_size=0)
    student = TorchaoQuantizer().prepare(copy.deepcopy(tiny_model("qwen3_moe")), params, None)
    student.config.output_router_logits = True  # as TRL trains a MoE model: the copy must not compute the loss
    engine = RolloutEngine.for_student(student, bucket=8)
    experts = engine.model.model.layers[0].mlp.experts
    assert type(experts).__name__ == "Qwen3MoeExperts" and not hasattr(experts, "weight_fake_quantizers")
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    inputs = {"prompts": ids, "prompt_attention_mask": torch.ones_like(ids)}
    config = GenerationConfig(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    with no_router_loss(student):  # today's path needs it; the copy does not
        expected = todays_path(student, inputs, config)
    assert_same(expected, engine.generate(inputs, config))


def test_compiles_counts_the_bucketed_shapes():
    tokenizer, student = tiny_student()
    engine = RolloutEngine.for_student(student, bucket=8)
    config = gkd_config(tokenizer, sample=False, new=4)
    lengths = []
    for lead in [("", "", ""), ("maybe ", "", ""), ("maybe " * 8, "", "")]:
        inputs = prompts(tokenizer, lead=lead)
        lengths.append(inputs["prompts"].shape[1])
        engine.generate(inputs, config)
    assert lengths == [8, 9, 16]
    assert engine.compiles == 2 and engine.compile_seconds > 0  # 9 and 16 tokens share the 16 bucket
    engine.generate(prompts(tokenizer, QUESTIONS[:2], lead=("", "")), config)  # a smaller batch: its own shape
    assert engine.compiles == 3


def test_a_bfloat16_engine_holds_its_own_copy_of_an_fp32_student_and_refreshes_it():
    tokenizer, student = tiny_student()
    inputs, config = prompts(tokenizer), gkd_config(tokenizer, sample=False)
    engine = RolloutEngine.for_student(student, dtype=torch.bfloat16, bucket=8)
    assert {p.dtype for p in engine.model.parameters()} == {torch.bfloat16}
    q_proj = student.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        assert torch.equal(engine.model.model.layers[0].self_attn.q_proj.weight,
                           q_proj.weight_fake_quantizer(q_proj.weight).bfloat16())
        ids = engine.generate(inputs, config)[0]
        student.model.norm.weight.mul_(2.0)
        engine.refresh()
    assert torch.equal(engine.model.model.norm.weight, student.model.norm.weight.bfloat16())
    assert ids.shape[1] > inputs["prompts"].shape[1]


def test_an_fp32_engine_shares_every_weight_it_does_not_round():
    tokenizer, student = tiny_student()
    engine = RolloutEngine.for_student(student)
    shared = {p.data_ptr() for p in student.parameters()} & {p.data_ptr() for p in engine.model.parameters()}
    quantized = [m for m in student.modules() if hasattr(m, "weight_fake_quantizer")]
    assert len(shared) == len(list(student.parameters())) - len(quantized)
    assert all(m.weight_fake_quantizer is not None for m in quantized)  # the student is left as it was
    assert not any(p.requires_grad for p in engine.model.parameters()) and not engine.model.training


def test_students_the_engine_cannot_copy_exactly_keep_todays_path():
    from peft import LoraConfig, get_peft_model
    from torchao.quantization.qat.fake_quantizer import FakeQuantizerBase

    class Unknown(FakeQuantizerBase):
        def forward(self, x):
            return x

    _, student = tiny_student()
    student.model.norm.odd_quantizer = Unknown()
    assert "odd_quantizer" in RolloutEngine.why_not(student) and RolloutEngine.for_student(student) is None
    _, student = tiny_student(bits=4, group_size=32, embeddings=True)
    student.lm_head.weight = student.model.embed_tokens.weight  # tied to a quantized embedding
    assert "tied" in RolloutEngine.why_not(student)
    _, student = tiny_student()
    dora = get_peft_model(student, LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    assert "DoRA" in RolloutEngine.why_not(dora) and RolloutEngine.for_student(dora) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="transformers compiles the static-cache decode on CUDA only")
def test_on_cuda_the_decode_step_is_compiled_and_a_refresh_does_not_recompile_it():
    from torch._dynamo.utils import counters

    tokenizer, student = tiny_student()
    student = student.cuda()
    inputs = {k: v.cuda() for k, v in prompts(tokenizer).items()}
    config = gkd_config(tokenizer, sample=False)
    engine = RolloutEngine.for_student(student, bucket=16)
    first = engine.generate(inputs, config)
    assert engine.compiled and engine.compiles == 1
    graphs = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p), alpha=0.05)
    stepped = engine.generate(inputs, config)
    assert counters["stats"]["unique_graphs"] == graphs  # written in place: the graphs read the new weights
    assert not torch.equal(first[0], stepped[0])
    eager = copy.deepcopy(config)
    eager.disable_compile = True
    assert_same(engine.generate(inputs, eager), stepped)
