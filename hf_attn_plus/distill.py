"""Attention transfer (LoLCATs step 1): each layer's mechanism output next to the dense teacher's, in one forward."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .masking import TokenPositions
from .registry import PREFIX


@dataclasses.dataclass
class AttentionPair:
    student: torch.Tensor  # the mechanism's output [B, q, Hq, Dv], differentiable w.r.t. its weights
    teacher: torch.Tensor  # dense attention on the same query/key/value, no gradient


@contextlib.contextmanager
def attention_pairs(
    model: torch.nn.Module, teacher: str = "sdpa", propagate: str = "teacher"
) -> Iterator[dict[int, AttentionPair]]:
    """Within the block, every forward of `model` records {layer_idx: AttentionPair} in the yielded dict.

    Both outputs come from the same query, key and value (the model's own projections and RoPE), so their gap is
    exactly what the mechanism's new weights must close: the LoLCATs attention-transfer loss is e.g.
    `sum(F.mse_loss(p.student, p.teacher) for p in pairs.values())`, taken over real tokens only when the batch is
    padded (positions [B, q] with attention_mask == 0 hold arbitrary values in both).

    `teacher`: a transformers attention implementation ('sdpa' or 'eager'), run without gradient.
    `propagate`: which output the next layer sees: 'teacher' (default; every layer trains on the teacher's hidden
    states, as LoLCATs does, and layers do not interact through gradients) or 'student'.
    The model must run one of the plugin's mechanisms; the dict is cleared at each forward. Run with use_cache=False.
    The mechanism's registered function is swapped for the block's duration, for every model in the process.
    """
    if propagate not in ("teacher", "student"):
        raise ValueError(f"propagate must be 'teacher' or 'student', got {propagate!r}")
    name = model.config._attn_implementation
    if not (isinstance(name, str) and name.startswith(PREFIX)):
        raise ValueError(f"attention_pairs needs a model running an hf_attn_plus mechanism, this one runs {name!r}")
    student_fn, teacher_fn = ALL_ATTENTION_FUNCTIONS[name], ALL_ATTENTION_FUNCTIONS[teacher]
    pairs: dict[int, AttentionPair] = {}

    def paired(module: torch.nn.Module, query, key, value, attention_mask, *args: Any, **kwargs: Any):
        if module.layer_idx == 0:
            pairs.clear()
        student, _ = student_fn(module, query, key, value, attention_mask, *args, **kwargs)
        dense_mask = attention_mask.dense_mask() if isinstance(attention_mask, TokenPositions) else attention_mask
        with torch.no_grad():
            reference, _ = teacher_fn(module, query, key, value, dense_mask, *args, **kwargs)
        pairs[module.layer_idx] = AttentionPair(student, reference)
        return (reference if propagate == "teacher" else student), None

    AttentionInterface.register(name, paired)
    try:
        yield pairs
    finally:
        AttentionInterface.register(name, student_fn)
