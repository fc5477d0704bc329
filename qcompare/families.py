"""Tiny configs of any causal-LM family transformers ships, derived from the family's own config class:
its defaults with every size cut to a tiny one (hidden 64, 2 layers, 4 heads, 4 experts, ...), per-layer
lists cut to the layers kept (one of each kind a hybrid model mixes), token ids inside the vocabulary.
``FAMILY`` holds what these rules cannot know; ``moe_families`` lists the mixture-of-experts ones.

Every config here is built in milliseconds, without the hub; ``qcompare.testing.tiny_model`` builds the
model (tests/study/test_families.py proves a forward pass of each)."""

from __future__ import annotations

from typing import Any

DEPTH = ("num_hidden_layers", "n_layer", "num_layers")
# a size key → its tiny value, set wherever the family's config has the key (None included); every Linear
# they make is at least 32 wide along its input, so groups of 32 divide it
SIZES: dict[str, Any] = {
    "hidden_size": 64, "d_model": 64, "n_embd": 64,
    "intermediate_size": 128, "ffn_hidden_size": 128, "n_inner": 128, "intermediate_size_mlp": 128,
    "moe_intermediate_size": 32, "expert_intermediate_size": 32, "shared_expert_intermediate_size": 32,
    "moe_shared_expert_intermediate_size": 32, "shared_intermediate_size": 32, "expert_ffn_hidden_size": 32,
    "num_attention_heads": 4, "n_head": 4, "num_key_value_heads": 2, "head_dim": 16,
    "max_position_embeddings": 256, "vocab_size": 128,
    # experts: 4, two per token, one group, one shared; the first layer dense where a family has dense ones
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4, "zero_expert_num": 2,
    "num_experts_per_tok": 2, "num_experts_per_token": 2, "moe_topk": 2, "moe_k": 2, "top_k": 2, "top_k_experts": 2,
    "n_group": 1, "topk_group": 1, "num_expert_group": 1, "n_shared_experts": 1, "num_shared_experts": 1,
    "first_k_dense_replace": 1, "num_dense_layers": 1,
    # switches that turn a family's mixture of experts on
    "is_moe": True, "enable_moe_block": True,
    # multi-head latent attention (DeepSeek's): queries and keys 8 + 8 (no rope + rope), values 16
    "kv_lora_rank": 32, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "qk_head_dim": 16, "v_head_dim": 16,
    # grouped low-rank output projections, gated norms (DeepSeek-V4, AXK2)
    "o_groups": 2, "o_lora_rank": 32, "gated_norm_rank": 32,
    # sparse-attention indexers
    "index_n_heads": 2, "index_head_dim": 16, "index_topk": 8, "indexer_n_heads": 2, "indexer_kv_heads": 1,
    "indexer_head_dim": 16, "indexer_budget": 8, "indexer_compress_ratio": 2,
    # state-space and linear-attention layers
    "mamba_n_heads": 4, "mamba_num_heads": 4, "mamba_d_head": 16, "mamba_head_dim": 16, "mamba_d_state": 16,
    "ssm_state_size": 16, "mamba_n_groups": 1, "n_groups": 1, "mamba_chunk_size": 16, "chunk_size": 16,
    "mamba_dt_rank": 32, "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_num_key_heads": 2,
    "linear_num_value_heads": 4, "linear_head_dim": 32, "linear_num_heads": 4,
    # per-layer embeddings, n-gram tables, routers with their own width
    "vocab_size_per_layer_input": 128, "hidden_size_per_layer_input": 32, "router_hidden_size": 32,
    "hc_lowrank": 32, "ngram_vocab_size_base": 256, "split_ngram_parts": 4, "heads_per_ngram": 2,
}
# keys whose None means "off": sized only where the family's defaults turn them on
OPTIONAL = {"q_lora_rank": 64, "sliding_window": 8}
# what the rules cannot know, family by family
FAMILY: dict[str, dict[str, Any]] = {
    # an attention layer beside the state-space one (the defaults' first layers are all Mamba)
    "jamba": dict(attn_layer_period=2, attn_layer_offset=0, expert_layer_period=2, expert_layer_offset=1,
                  use_mamba_kernels=False),
    "granitemoehybrid": dict(mamba_d_head=32, layer_types=["linear_attention", "full_attention"]),
    "nemotron_h": dict(layers_block_type=["linear_attention", "moe", "full_attention", "moe"], use_mamba_kernels=False),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"]),  # its defaults have no layer types at all
    "zaya": dict(num_experts_per_tok=1),  # "ZAYA currently supports num_experts_per_tok=1 only"
}
TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def family_config(family: str, **overrides):
    """The tiny config of any transformers model type, by the rules above; ``overrides`` win."""
    import torch
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    base = CONFIG_MAPPING[family]().to_dict()
    tiny = {k: v for k, v in SIZES.items() if k in base}
    tiny.update({k: v for k, v in OPTIONAL.items() if base.get(k) is not None})
    if base.get("head_dim") is not None and base["head_dim"] == base.get("qk_rope_head_dim"):
        tiny["head_dim"] = SIZES["qk_rope_head_dim"]  # latent attention whose head_dim is the rope part
    if base.get("num_key_value_heads") is not None and base["num_key_value_heads"] == base.get("num_attention_heads"):
        tiny["num_key_value_heads"] = tiny["num_attention_heads"]  # multi-head attention stays multi-head
    keep = _layers_kept(base)
    tiny.update({k: [v[i] for i in keep] for k, v in _per_layer(base).items()})
    tiny.update({k: len(keep) for k in DEPTH if k in base})
    if isinstance(base.get("per_layer_config"), dict):  # Gemma 4: per-layer head sizes, keyed by layer index
        tiny["per_layer_config"] = {f"{j:02d}": {**base["per_layer_config"][f"{i:02d}"], "head_dim": 32}
                                    for j, i in enumerate(keep) if f"{i:02d}" in base["per_layer_config"]}
    if "hybrid_sliding" in str(base.get("layer_types")):
        tiny["sliding_window"] = OPTIONAL["sliding_window"]
    tiny.update({k: v for k, v in TOKEN_IDS.items() if isinstance(base.get(k), int) and base[k] >= tiny["vocab_size"]})
    return AutoConfig.for_model(family, dtype=torch.float32, **{**tiny, **FAMILY.get(family, {}), **overrides})


def _depth(base: dict) -> int | None:
    return next((base[k] for k in DEPTH if isinstance(base.get(k), int)), None)


def _per_layer(base: dict) -> dict[str, list]:
    """The config's lists with one entry per layer (layer types, block types, ...)."""
    n = _depth(base)
    return {k: v for k, v in base.items() if n and n > 2 and isinstance(v, list) and len(v) == n}


def _layers_kept(base: dict) -> list[int]:
    """Layers 0 and 1, and the first layer of each kind any per-layer list names (at most 4 layers)."""
    firsts = {values.index(x) for values in _per_layer(base).values() for x in values
              if isinstance(x, (str, int, float, bool))}
    return sorted({0, 1} | firsts)[:4]


def causal_lm_families() -> list[str]:
    """Every model type transformers' AutoModelForCausalLM builds."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok")


def moe_families() -> list[str]:
    """The causal-LM families whose config counts experts: transformers' mixtures of experts."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return [f for f in causal_lm_families() if any(k in _defaults(CONFIG_MAPPING[f]) for k in EXPERT_KEYS)]


def _defaults(config_class) -> dict:
    try:
        return config_class().to_dict()
    except Exception:  # noqa: BLE001 - a config with required parts is no tiny causal LM of its own
        return {}
