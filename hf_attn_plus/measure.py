"""Speed and peak memory of a model call, on CPU or CUDA: what `hf-attn-plus compare` reports per context length."""

from __future__ import annotations

import statistics
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TensorMemoryPeak(TorchDispatchMode):
    """Peak bytes of tensor storage created while active and still alive, on any device. Used on CPU, where
    tracemalloc cannot see torch's allocations and the process RSS hides memory the allocator reuses."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _release(self, ptr: int) -> None:
        self.current -= self.live.pop(ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Views and in-place results share an input's storage: no new memory, whether or not that input is tracked.
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            ptr = storage.data_ptr()
            if ptr in inputs or ptr in self.live or storage.nbytes() == 0:
                continue
            self.live[ptr] = storage.nbytes()
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._release, ptr)
        return out


def seconds(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def peak_mb(fn: Callable[[], Any], device: torch.device) -> float:
    """Peak memory of the tensors `fn` creates, in MB. CUDA: max_memory_allocated above what was allocated before;
    elsewhere: TensorMemoryPeak (a separate, untimed run: tracking slows every op)."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    with TensorMemoryPeak() as tracker:
        fn()
    return tracker.peak / 2**20


@torch.no_grad()
def speed(model: torch.nn.Module, ids: torch.Tensor, decode_tokens: int, repeats: int) -> dict[str, float]:
    """Median prefill time and decode time per token (greedy, with a KV cache) after `ids`, and their peak memory."""
    device = ids.device

    def prefill():
        out = model(ids, use_cache=True)
        return out.past_key_values, out.logits[:, -1:].argmax(-1)

    def decode(cache, token):
        for _ in range(decode_tokens):
            token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)

    def timed_decode():
        cache, token = prefill()
        return seconds(lambda: decode(cache, token), device)

    def decode_peak():
        cache, token = prefill()
        return peak_mb(lambda: decode(cache, token), device)

    prefill()  # warm-up
    return {
        "prefill_ms": 1000 * statistics.median(seconds(prefill, device) for _ in range(repeats)),
        "decode_ms_per_token": 1000 * statistics.median(timed_decode() for _ in range(repeats)) / max(decode_tokens, 1),
        "prefill_peak_mb": peak_mb(prefill, device),
        "decode_peak_mb": decode_peak(),
    }
