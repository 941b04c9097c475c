import os

# Triton kernels run on CPU through the interpreter; it must be chosen before any kernel is defined.
os.environ.setdefault("TRITON_INTERPRET", "1")

import functools

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_attn_plus  # noqa: F401  (registers mechanisms and patches)
from hf_attn_plus.tiny import tiny_config

ARCHS = ("llama", "qwen2", "qwen3", "deepseek_v3")


def build(arch: str, mechanism: str, **options) -> torch.nn.Module:
    """A tiny random model of `arch` running `mechanism`, with its attn_plus weights perturbed off their init so
    tests see trained-like weights (identity hedgehog maps would hide per-head mistakes)."""
    torch.manual_seed(0)
    config = tiny_config(arch, max_position_embeddings=2048, hf_attn_plus=options)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=f"hf_attn_plus:{mechanism}").eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".attn_plus." in name:
                param.add_(torch.randn_like(param) * 0.3)
    return model


@functools.lru_cache(maxsize=None)
def _shared(arch: str, mechanism: str, options: tuple) -> torch.nn.Module:
    return build(arch, mechanism, **dict(options))


def shared(arch: str, mechanism: str, **options) -> torch.nn.Module:
    """`build`, cached across tests: for tests that do not change the model (building costs ~1 s on a busy CPU)."""
    return _shared(arch, mechanism, tuple(sorted(options.items())))


@pytest.fixture
def make():
    return build
