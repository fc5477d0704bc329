"""Faster on-policy rollouts, exactly the same samples.

While ``generate`` decodes, the student's weights do not change, yet each decode step runs every
fake quantizer on every weight again (quantize → dequantize a whole layer per token). Inside
``weights_rounded_once`` a fake quantizer given a Parameter returns the tensor it computed for that
Parameter the first time (keyed by the Parameter and its version, so an in-place update is seen);
activations, which change every step, are rounded as usual. The rounded weights are the same
tensors the student would compute, so the model computes the same logits and, with the same random
state, samples the same tokens (tests/test_rollouts.py).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


@contextlib.contextmanager
def weights_rounded_once(model: nn.Module):
    """Round each fake-quantized weight once for the block (no gradients needed there)."""
    from torchao.quantization.qat.fake_quantizer import FakeQuantizerBase

    quantizers = [m for m in model.modules() if isinstance(m, FakeQuantizerBase)]
    originals = []
    for q in quantizers:
        memo: dict = {}
        forward = q.forward

        def once(x, *args, _forward=forward, _memo=memo, **kwargs):
            if not isinstance(x, nn.Parameter) or torch.is_grad_enabled():
                return _forward(x, *args, **kwargs)
            key = (id(x), x._version)
            if key not in _memo:
                _memo[key] = _forward(x, *args, **kwargs)
            return _memo[key]

        originals.append((q, q.__dict__.get("forward")))
        q.forward = once
    try:
        yield model
    finally:
        for q, before in originals:
            if before is None:
                del q.forward
            else:
                q.forward = before
