"""On-policy rollouts round each fake-quantized weight once per generate call, not once per
token: the same samples (token for token, for the same seed), at a fraction of the work."""

from __future__ import annotations

import contextlib
import copy
from unittest import mock

import pytest
import torch
from transformers import GenerationConfig

from qcompare.sdk.registry import get_registry
from qcompare.testing import tiny_teacher, tiny_tokenizer
from qcompare_plugins.distillers.rollouts import weights_rounded_once


@pytest.mark.parametrize("quantizer, params", [("torchao", dict(bits=4, group_size=32)),
                                               ("torchao", dict(bits=8, activations="int8")),
                                               ("nvfp4", {}), ("bnb", {})])
def test_rollouts_sample_the_same_tokens_with_weights_rounded_once(quantizer, params):
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "left"
    cls = get_registry().get("quantizer", quantizer)
    student = cls().prepare(copy.deepcopy(tiny_teacher()), cls.Params(**params), None).train()
    prompts = tokenizer([f"<|user|> what is {a} plus {b} <|end|> <|assistant|>" for a, b in [(1, 2), (13, 4), (7, 7)]],
                        return_tensors="pt", padding=True)
    config = GenerationConfig(max_new_tokens=12, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)

    def sample(seed):
        torch.manual_seed(seed)
        return student.generate(**prompts, generation_config=config)

    quantizers = [m for m in student.modules() if type(m).__name__.endswith("FakeQuantizer")]
    calls = []
    patches = []
    for cls_ in {type(q) for q in quantizers}:  # count the rounding work itself, not the module calls
        def counted(self, *args, _forward=cls_.forward, **kwargs):
            calls.append(1)
            return _forward(self, *args, **kwargs)
        patches.append(mock.patch.object(cls_, "forward", counted))
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        reference = [sample(seed) for seed in range(3)]
        per_token = len(calls)
        calls.clear()
        with weights_rounded_once(student):
            fast = [sample(seed) for seed in range(3)]
            rounded = len(calls)
            # an in-place update (an optimizer step) is seen: the weight's version changed
            layer = next(m for m in student.modules() if hasattr(m, "weight_fake_quantizer"))
            with torch.no_grad():
                layer.weight.mul_(-1.0)
            changed = sample(0)
    assert all(torch.equal(a, b) for a, b in zip(reference, fast))
    assert rounded < per_token
    if "activations" not in params:  # weight-only: each weight rounded once, not once per token
        assert rounded <= len(quantizers) < per_token / 10
    assert not torch.equal(changed, reference[0]) or changed.shape != reference[0].shape
    assert all("forward" not in q.__dict__ for q in quantizers)  # left as found
