import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # only the local-server tests talk HTTP, to 127.0.0.1

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_attn_plus
from hf_attn_plus.demo import char_tokenizer, load_tiny_subject
from hf_attn_plus.tiny import tiny_config


@pytest.fixture(autouse=True)
def one_thread():
    """Two shared cores: one torch thread is far faster here than two oversubscribed ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_tiny(path, model_type: str, mechanism: str | None = None, **options):
    """A tiny random model of `model_type` ("default": compare's embedded `tiny`) with the character tokenizer,
    optionally converted, saved to `path`."""
    torch.manual_seed(0)
    if model_type == "default":
        model = load_tiny_subject().model
    else:
        model = AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()
    if mechanism:
        hf_attn_plus.set_attention(model, mechanism, **options)
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return model


@pytest.fixture
def tiny_dir(tmp_path):
    def make(model_type: str, mechanism: str | None = None, **options):
        path = tmp_path / f"{model_type}-{mechanism or 'dense'}"
        return path, save_tiny(path, model_type, mechanism, **options)

    return make
