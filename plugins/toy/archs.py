"""Tiny random-weight causal LMs of several architectures, built offline from config.

Tests use them to check that a plugin works on more than one layer layout (fused qkv in
phi3, GQA, tied embeddings in gemma...) without a hub download. Feed them token ids.
"""

from __future__ import annotations

import torch

ARCHS = ("qwen3", "llama", "qwen2", "mistral", "gemma", "phi3")

# Shared shape of every tiny model: small enough that a forward pass takes milliseconds.
_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    # Defaults of some configs (phi3: eos 32000) point outside a tiny vocabulary.
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def _config(arch: str, vocab_size: int):
    from transformers import (
        GemmaConfig,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    configs = {
        "qwen3": (Qwen3Config, dict(head_dim=16)),
        "llama": (LlamaConfig, {}),
        "qwen2": (Qwen2Config, {}),
        "mistral": (MistralConfig, dict(head_dim=16, sliding_window=None)),
        "gemma": (GemmaConfig, dict(head_dim=16)),
        "phi3": (Phi3Config, {}),
    }
    if arch not in configs:
        from qcompare.sdk import QcompareError

        raise QcompareError(f"unknown tiny architecture {arch!r}; allowed: {', '.join(ARCHS)}")
    cls, extra = configs[arch]
    return cls(vocab_size=vocab_size, dtype=torch.float32, **_SHAPE, **extra)


def tiny_model(arch: str, vocab_size: int = 128, seed: int = 0):
    """A random-weight float32 ``*ForCausalLM`` of ``arch``: 2 layers, hidden 64, 4 heads."""
    from transformers import AutoModelForCausalLM

    config = _config(arch, vocab_size)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()
