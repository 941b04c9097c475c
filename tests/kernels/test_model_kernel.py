"""Model level: backend='kernel' (forced on CPU through the interpreter) reproduces the reference backend."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_attn_plus
from hf_attn_plus.kernels import sparse_attention
from hf_attn_plus.tiny import tiny_config

SPARSE = {
    "sliding_window": dict(window=5, sinks=2),
    "topk": dict(budget=4, sinks=1, window=3),
    "topk/layer": dict(budget=4, sinks=1, window=3, choose_per="layer"),
    "block_topk/bound": dict(block_size=4, budget=2, sink_blocks=1, local_blocks=1, score="bound"),
    "block_topk": dict(block_size=4, budget=2, sink_blocks=1, local_blocks=1, pool_size=2),
    "dilated": dict(dilation=3, window=3),
    "block_sparse": dict(block_size=4, threshold=0.6),
}


def tiny_model(arch):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(arch), attn_implementation="sdpa").eval()


def padded_batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (2, 19), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    return ids, mask


@pytest.mark.parametrize("arch,name", [("llama", "block_topk/bound"), ("qwen3", "block_topk"), ("deepseek_v3", "topk"), ("qwen3", "topk/layer")])
def test_logits_and_generation_equal_reference_backend(arch, name):
    """Llama: GQA 4; DeepSeek-V3: q/k dim 12 != v dim 8. Left padding; cached decode goes through selected_decode."""
    model = tiny_model(arch)
    ids, mask = padded_batch()
    results = {}
    for backend in ("reference", "kernel"):
        hf_attn_plus.set_attention(model, name.split("/")[0], backend=backend, **SPARSE[name])
        logits = model(ids, attention_mask=mask).logits
        tokens = model.generate(ids[:, :10], attention_mask=mask[:, :10], max_new_tokens=5, do_sample=False)
        results[backend] = logits[mask.bool()], tokens
    torch.testing.assert_close(results["kernel"][0], results["reference"][0], atol=2e-5, rtol=1e-4)
    assert torch.equal(results["kernel"][1], results["reference"][1])


def test_cached_generation_equals_uncached():
    model = tiny_model("llama")
    hf_attn_plus.set_attention(model, "sliding_window", backend="kernel", **SPARSE["sliding_window"])
    ids, mask = padded_batch()
    runs = [
        model.generate(ids[:, :9], attention_mask=mask[:, :9], max_new_tokens=5, do_sample=False, use_cache=use_cache)
        for use_cache in (True, False)
    ]
    assert torch.equal(runs[0], runs[1])


def test_training_gradients_equal_reference_backend():
    """Prefill backward through the kernel, on the prefill mechanism block_sparse."""
    ids, mask = padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    grads = {}
    for backend in ("reference", "kernel"):
        model = tiny_model("qwen2").train()
        hf_attn_plus.set_attention(model, "block_sparse", backend=backend, **SPARSE["block_sparse"])
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        grads[backend] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads["kernel"].keys() == grads["reference"].keys()
    for n, g in grads["reference"].items():
        torch.testing.assert_close(grads["kernel"][n], g, atol=1e-5, rtol=1e-4, msg=n)


def test_auto_backend_uses_reference_on_cpu(monkeypatch):
    def no_kernel(*args, **kwargs):
        raise AssertionError("the kernel ran on CPU with backend='auto'")

    monkeypatch.setattr(sparse_attention, "sparse_attention", no_kernel)
    model = tiny_model("llama")
    hf_attn_plus.set_attention(model, "topk", **SPARSE["topk"])
    model(padded_batch()[0])
    hf_attn_plus.set_attention(model, "topk", backend="kernel", **SPARSE["topk"])
    with pytest.raises(AssertionError, match="kernel ran"):
        model(padded_batch()[0])


def test_kernel_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = tiny_model("llama")
    hf_attn_plus.set_attention(model, "topk", backend="kernel", **SPARSE["topk"])
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        model(padded_batch()[0])


def test_importable_without_triton_and_a_kernel_request_explains():
    script = """
import sys
sys.modules["triton"] = None  # as if not installed
import torch, hf_attn_plus
from hf_attn_plus.kernel_inputs import attend_kernel
from hf_attn_plus.masking import build_context
from hf_attn_plus.structure import DENSE, Selection
ctx = build_context(torch.ones(1, 1, 1, 2, dtype=torch.bool))
try:
    attend_kernel(torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4), ctx, Selection(DENSE), 1.0)
except ImportError as error:
    print(error)
"""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))  # this checkout, not an install
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert "hf_attn_plus kernels need Triton" in result.stdout, result.stderr
