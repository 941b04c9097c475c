"""Tiny models and option sets shared by the core model-level tests."""

import torch
from transformers import AutoModelForCausalLM

import hf_attn_plus
from hf_attn_plus.tiny import ARCHITECTURES, FAMILIES, tiny_config

# Families whose tiny configs leave the model's own sliding window out, with it (shorter than the tests' contexts, so
# cached generation runs past it): every layer windowed (Mistral: 16, wide enough that the SPARSE settings drop keys
# inside it), or a windowed layer (10) and a full one.
WINDOWED = {
    "mistral@window": ("mistral", dict(sliding_window=16)),
    "qwen2@window": ("qwen2", dict(use_sliding_window=True, sliding_window=10, max_window_layers=1)),
    "gemma2@window": ("gemma2", dict(sliding_window=10, layer_types=["sliding_attention", "full_attention"])),
    "gpt_oss@window": ("gpt_oss", dict(sliding_window=10, layer_types=["sliding_attention", "full_attention"])),
}

# Every architecture the model-level tests run: the patched ones, the other decoder families, windowed variants.
MODEL_TYPES = ARCHITECTURES + FAMILIES + tuple(WINDOWED)
# Those whose attention soft-caps logits (Gemma 2) or has learned sinks (gpt-oss): lighthouse (its pyramid computes
# its own softmax) refuses them.
WITH_LOGIT_OPTIONS = ("gemma2", "gemma2@window", "gpt_oss", "gpt_oss@window")
# Those with the model's own sliding window in some layer: lighthouse's training path refuses them.
WITH_MODEL_WINDOW = ("gemma3_text", "cohere2") + tuple(WINDOWED)
PLAIN_WITHOUT_WINDOW = tuple(m for m in MODEL_TYPES if m not in WITH_LOGIT_OPTIONS + WITH_MODEL_WINDOW)

MECHANISMS = ("sliding_window", "topk", "block_topk", "dilated", "block_sparse")

# Budgets that cover any context used in these tests: each mechanism must then be dense attention.
COVERING = {
    "sliding_window": dict(window=512, sinks=0),
    "topk": dict(budget=512, sinks=0, window=0),
    "topk/layer": dict(budget=512, sinks=0, window=0, choose_per="layer"),
    "block_topk": dict(block_size=4, budget=128),
    "dilated": dict(dilation=1, window=1),
    "block_sparse": dict(block_size=4, threshold=1.0),
}

# Budgets that drop most of a ~30-token context.
SPARSE = {
    "sliding_window": dict(window=5, sinks=2),
    "topk": dict(budget=4, sinks=1, window=3),
    "topk/layer": dict(budget=4, sinks=1, window=3, choose_per="layer"),
    "block_topk": dict(block_size=4, budget=2, sink_blocks=1, local_blocks=1),
    "dilated": dict(dilation=3, window=3),
    "block_sparse": dict(block_size=4, threshold=0.5),
}


def own_attention(config) -> str:
    """The model's own attention to compare against: SDPA, or eager where the model has no SDPA path."""
    return "sdpa" if AutoModelForCausalLM._model_mapping[type(config)]._supports_sdpa else "eager"


def tiny_model(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    model_type, windowed = WINDOWED.get(arch, (arch, {}))
    config = tiny_config(model_type, **windowed, **overrides)
    return AutoModelForCausalLM.from_config(config, attn_implementation=own_attention(config)).eval()


def with_mechanism(model, name, options):
    """`name` may carry a variant after a slash ("topk/layer"): its options are in the tables above."""
    hf_attn_plus.set_attention(model, name.split("/")[0], **options)
    return model


def token_batch(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (batch, length), generator=g)


def left_pad(sequences, pad_id: int = 0):
    """Left-padded ids, attention mask and position ids counting real tokens, as generate() builds them."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = seq
        mask[row, width - len(seq) :] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def right_pad(sequences, pad_id: int = 0):
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    return ids, mask, torch.arange(width).expand(len(sequences), width)
