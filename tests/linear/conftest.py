import os

# Triton kernels run on CPU through the interpreter; it must be chosen before any kernel is defined.
os.environ.setdefault("TRITON_INTERPRET", "1")

import functools

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_attn_plus  # noqa: F401  (registers mechanisms and patches)
from hf_attn_plus.tiny import PATCHED_ARCHITECTURES, tiny_config

ARCHS = PATCHED_ARCHITECTURES


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


def backend_run(model: torch.nn.Module, backend: str, new_tokens: int) -> tuple:
    """With `backend`: logits of a left-padded batch, its cached greedy continuation, and one training step's
    gradients (by parameter name)."""
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    model.config.hf_attn_plus = dict(model.config.hf_attn_plus, backend=backend)
    model.zero_grad()
    model(ids, attention_mask=mask, labels=ids).loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return logits, generated, grads


def assert_backend_runs_match(kernel: tuple, reference: tuple, weights: str) -> None:
    """Two `backend_run`s agree: logits, tokens, and every gradient (which must include parameters named `weights`)."""
    (kernel_logits, kernel_generated, kernel_grads), (reference_logits, reference_generated, reference_grads) = (
        kernel, reference
    )
    torch.testing.assert_close(kernel_logits, reference_logits)
    assert torch.equal(kernel_generated, reference_generated)
    assert kernel_grads.keys() == reference_grads.keys() and any(weights in name for name in kernel_grads)
    for name, grad in kernel_grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-4, atol=1e-5, msg=name)
