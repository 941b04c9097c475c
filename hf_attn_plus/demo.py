"""The embedded default that `hf-attn-plus compare` runs on when no model is named: offline, seconds on a CPU.

Today it is a tiny random-init Llama (`tiny_config("llama")`, fixed seed) with a character tokenizer, evaluated on
the source of a standard-library module. Swap in a trained model by changing `load_default_model` only.
"""

from __future__ import annotations

import dataclasses
import inspect
import string

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .tiny import tiny_config

# ids 0-3 are special; printable ASCII and tab/newline keep their byte value, so every id is < 128 (the tiny vocab).
_SPECIALS = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
_CHARS = sorted(set(string.printable) - {"\r", "\x0b", "\x0c"})


@dataclasses.dataclass
class Subject:
    """What `compare` evaluates: a model, its tokenizer, the evaluation text and a name for reports."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    text: str
    name: str


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per ASCII character (id = byte value); anything else is <unk>. Fits any tiny config (vocab 128)."""
    vocab = dict(_SPECIALS) | {c: ord(c) for c in _CHARS}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def default_text() -> str:
    """Real text every machine has: the source of the standard library's argparse module (~100k characters)."""
    import argparse

    return inspect.getsource(argparse)


def load_default_model() -> Subject:
    """The default subject of `compare`. Replace the body (e.g. with a trained teacher) to change the demo."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", max_position_embeddings=1024))
    return Subject(model.eval(), char_tokenizer(), default_text(), "tiny random-init Llama (embedded default)")


def load_subject(path: str, dtype: torch.dtype = torch.float32) -> Subject:
    """A local model directory (or Hub id already in the cache) with its tokenizer."""
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return Subject(model.eval(), AutoTokenizer.from_pretrained(path), default_text(), path)
