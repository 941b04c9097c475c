"""Tiny random-init configs of every supported architecture: for tests, the embedded demo and smoke benchmarks."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PreTrainedConfig

# Head counts give GQA (4 query heads per KV head on Llama, 2 on Qwen); DeepSeek uses MLA with q/k head dim
# (nope + rope = 12) different from v head dim (8), and V3.2 adds its lightning indexer with a small top-k.
_TINY: dict[str, dict[str, Any]] = {
    "llama": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=8),
    "qwen2": dict(num_attention_heads=4, num_key_value_heads=2),
    "qwen3": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=8),
    "deepseek_v3": dict(
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        moe_intermediate_size=16,
        first_k_dense_replace=1,
    ),
}
_TINY["deepseek_v32"] = dict(_TINY["deepseek_v3"], index_n_heads=2, index_head_dim=8, index_topk=12)

# The architectures hf_attn_plus was first written for.
ARCHITECTURES: tuple[str, ...] = tuple(_TINY)

# Other decoder families. Granite passes its attention multiplier as `scaling`; Phi3 has a fused qkv projection;
# Mixtral and the MoE Qwens route experts; OLMo2 normalises q and k. Their own windows are off here (tested apart).
_FAMILIES: dict[str, dict[str, Any]] = {
    "mistral": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=None),
    "mixtral": dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=None, num_local_experts=4,
        num_experts_per_tok=2,
    ),
    "phi3": dict(num_attention_heads=4, num_key_value_heads=2),
    "olmo2": dict(num_attention_heads=4, num_key_value_heads=2),
    "qwen2_moe": dict(
        num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
    ),
    "qwen3_moe": dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=16,
    ),
    "granite": dict(
        num_attention_heads=4, num_key_value_heads=2, attention_multiplier=0.3, embedding_multiplier=2.0,
        residual_multiplier=0.5, logits_scaling=2.0,
    ),
    # Logit soft-capping on full-attention layers; weights large enough (initializer_range) that the cap and the
    # sinks below change the output.
    "gemma2": dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=16, attn_logit_softcapping=2.0,
        layer_types=["full_attention"] * 2, initializer_range=0.2,
    ),
    # Learned sink logits (`s_aux`) on full-attention layers; plain RoPE (its YaRN defaults assume 4k positions).
    "gpt_oss": dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
        layer_types=["full_attention"] * 2, rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        initializer_range=0.2,
    ),
    # Families with the model's own sliding window: a sliding layer (window 10, shorter than the tests' contexts)
    # and a full one.
    "gemma3_text": dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=16, sliding_window=10,
        layer_types=["sliding_attention", "full_attention"],
    ),
    "cohere2": dict(
        num_attention_heads=4, num_key_value_heads=2, sliding_window=10,
        layer_types=["sliding_attention", "full_attention"],
    ),
}
_TINY.update(_FAMILIES)
FAMILIES: tuple[str, ...] = tuple(_FAMILIES)

# Those whose attention classes patches/attn_plus.py patches: mechanisms with weights run on these, in the layers
# whose model features their weights honour (see below).
PATCHED_ARCHITECTURES: tuple[str, ...] = (
    "llama", "qwen2", "qwen3", "deepseek_v3", "mistral", "mixtral", "phi3", "olmo2", "qwen2_moe", "qwen3_moe", "granite",
    "gemma3_text", "cohere2", "gemma2", "gpt_oss",
)
# Patched ones with a layer of the model's own sliding window in their tiny config: the linear family's weights go
# only in the other layers (option layers='full_attention'); indexer_topk's honour the window.
PATCHED_WITH_WINDOW_LAYERS: tuple[str, ...] = ("gemma3_text", "cohere2")
# Patched ones whose every layer soft-caps logits (Gemma 2) or has learned sinks (gpt-oss): only head_budget's gates
# (around a mechanism without weights) honour them.
PATCHED_WITH_LOGIT_OPTIONS: tuple[str, ...] = ("gemma2", "gpt_oss")


def tiny_config(model_type: str, **overrides: Any) -> PreTrainedConfig:
    """A two-layer config of `model_type` with hidden size 32 and vocabulary 128, CPU-friendly in fp32."""
    if model_type not in _TINY:
        raise ValueError(f"no tiny config for {model_type!r}; available: {', '.join(_TINY)}")
    kwargs: dict[str, Any] = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    kwargs.update(_TINY[model_type])
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)
