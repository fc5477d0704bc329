"""A LoRA student that is also its own teacher: one copy of the base weights instead of two.

With LoRA the student's base weights are frozen, and (for a quantizer that fake-quantizes
on the fly, like torchao QAT) they are bit-for-bit the teacher's weights. So:

- ``share_base_weights`` points every student weight at the teacher's storage (new
  Parameter objects over the same memory, so freezing the student does not touch the
  teacher's ``requires_grad``), and the student's own copy is freed;
- ``teacher_mode`` runs the student as the teacher: peft's ``disable_adapter()`` plus every
  fake quantizer's ``enabled = False`` (the SDK's ``FakeQuantizer`` contract: torchao's
  ``FakeQuantizedLinear`` and ``FakeQuantizedEmbedding``, qcompare's fused-expert and float-format
  fake quantizers, a plugin's own), in eval mode.
  Its logits equal the float teacher's exactly (tests/plugins/test_teacher_sharing.py).

A quantizer that changes the weights it prepares (GPTQ, AWQ) leaves a student whose base
is not the teacher; sharing is then refused and the cell keeps two copies. (The runner
itself builds a LoRA student over the teacher's memory when the quantizer allows it:
``qcompare.engine.pipeline.weight_sharing_copy``; sharing here then finds it already done.)
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from qcompare.sdk import fake_quantizers


def share_base_weights(teacher: nn.Module, student: nn.Module) -> str | None:
    """Make the student's weights views of the teacher's; None on success, else why not."""
    teacher_params = dict(teacher.named_parameters())
    student_params = dict(student.named_parameters())
    for name, tp in teacher_params.items():
        sp = student_params.get(name)
        if sp is None:
            return f"the student has no weight {name!r}"
        if sp.shape != tp.shape or sp.dtype != tp.dtype or sp.device != tp.device or not torch.equal(sp, tp):
            return f"the student's {name!r} is not the teacher's (the quantizer changed it)"
    replacement = {id(student_params[n]): nn.Parameter(tp.detach(), requires_grad=student_params[n].requires_grad)
                   for n, tp in teacher_params.items()}
    # tied weights appear once in named_parameters but in two modules: replace both
    for module in student.modules():
        for attr, p in list(module._parameters.items()):
            if p is not None and id(p) in replacement:
                module._parameters[attr] = replacement[id(p)]
    return None


def unshare_trainable(model: nn.Module, teacher: nn.Module) -> int:
    """Give any still-trainable shared weight its own copy (peft ``modules_to_save``), so the
    optimizer never writes into the teacher. Returns how many were copied."""
    storage = {p.data_ptr() for p in teacher.parameters()}
    copied = 0
    for p in model.parameters():
        if p.requires_grad and p.data_ptr() in storage:
            p.data = p.data.clone()
            copied += 1
    return copied


@contextlib.contextmanager
def teacher_mode(model: nn.Module):
    """Run ``model`` (a peft LoRA student over shared weights) as the float teacher."""
    quantizers = fake_quantizers(model)
    enabled = [q.enabled for q in quantizers]
    training = model.training
    adapters = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    try:
        for q in quantizers:
            q.enabled = False
        model.eval()
        with adapters:
            yield model
    finally:
        for q, was in zip(quantizers, enabled):
            q.enabled = was
        model.train(training)

