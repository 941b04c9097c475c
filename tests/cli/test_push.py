import json
import subprocess
import sys

import pytest
import torch
from huggingface_hub import constants, snapshot_download
from transformers import AutoModelForCausalLM

from hf_attn_plus.cli import main
from hf_attn_plus.hub import CardError, PushError, push, render_card

from .hub_server import HubServer, closed_endpoint

IDS = torch.tensor([[5, 40, 41, 42, 100, 101, 3, 7, 9, 11, 60, 61]])


@pytest.fixture
def hub(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the server is on 127.0.0.1
    with HubServer() as server:
        yield server


@pytest.fixture
def base_dir(tmp_path):
    """A stand-in for the original model: a card with a license, as downloaded models have."""
    path = tmp_path / "base"
    path.mkdir()
    (path / "README.md").write_text("---\nlicense: llama3.1\n---\n# base\n")
    return path


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_card_records_mechanism_license_and_measurements(tiny_dir, base_dir, tmp_path):
    path, _ = tiny_dir("llama", "topk", budget=3, window=2)
    report = {
        "model": "tiny", "environment": {"device": "cpu: test", "torch": "t", "transformers": "x"},
        "settings": {"lengths": [8], "quality_length": 8},
        "results": [{
            "label": "dense", "kept_fraction": 1.0, "perplexity": 2.0, "perplexity_delta": 0.0, "agreement": 1.0,
            "decode_agreement": 1.0,
            "layer_error": [0.0], "needle": {"8": 0.5},
            "speed": {"8": {"prefill_ms": 1.0, "decode_ms_per_token": 0.5, "prefill_peak_mb": 0.1}},
        }],
    }
    (path / "recipe.json").write_text(json.dumps({"recipe": "attention transfer", "data": "stdlib, 1M tokens"}))
    card = render_card(path, "me/tiny-topk", base_model=str(base_dir), report=report)
    text = str(card)
    assert card.data.license == "llama3.1" and "carried over from the base model" in text
    assert card.data.tags == ["hf_attn_plus", "hf_attn_plus-topk", "sparse-attention"]
    assert card.data.base_model is None  # a local path is not a Hub id
    assert 'attn_implementation="hf_attn_plus:topk"' in text and "`budget=3`, `window=2`" in text
    assert "pip install hf_attn_plus" in text and 'from_pretrained("me/tiny-topk")' in text
    assert "- recipe: attention transfer" in text and "- data: stdlib, 1M tokens" in text
    assert "| dense" in text and "cpu: test" in text

    hub_card = render_card(path, "me/x", base_model="meta-llama/Llama-3.1-8B", license="apache-2.0")
    assert hub_card.data.base_model == "meta-llama/Llama-3.1-8B" and hub_card.data.license == "apache-2.0"


def test_card_refuses_to_guess(tiny_dir, base_dir):
    converted, _ = tiny_dir("llama", "topk")
    with pytest.raises(CardError, match="pass --license"):
        render_card(converted, "me/x", base_model="nobody/unknown-model")
    dense, _ = tiny_dir("qwen2")
    with pytest.raises(CardError, match="pass --mechanism"):
        render_card(dense, "me/x", base_model=str(base_dir))


@pytest.mark.parametrize("model_type", ["default", "qwen3", "deepseek_v3"])
def test_push_download_load_identical(model_type, tiny_dir, base_dir, hub, tmp_path):
    path, model = tiny_dir(model_type, "block_topk", block_size=2, budget=1)
    card = render_card(path, "me/converted", base_model=str(base_dir))
    push(path, "me/converted", card, endpoint=hub.endpoint)
    local = snapshot_download("me/converted", endpoint=hub.endpoint, cache_dir=tmp_path / "cache")
    loaded = AutoModelForCausalLM.from_pretrained(local).eval()
    assert loaded.config._attn_implementation == "hf_attn_plus:block_topk"
    assert loaded.config.hf_attn_plus == {"block_size": 2, "budget": 1}
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    assert "hf_attn_plus:block_topk" in open(f"{local}/README.md").read()


def test_cli_push_adapter_round_trip(tiny_dir, hub, tmp_path, capsys):
    from peft import LoraConfig, PeftModel, get_peft_model

    base_path, _ = tiny_dir("qwen2")  # a dense base; the mechanism is chosen at load time, as the card says
    load_as_card_says = dict(attn_implementation="hf_attn_plus:sliding_window", hf_attn_plus={"window": 4})
    base = AutoModelForCausalLM.from_pretrained(base_path, **load_as_card_says)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    expected = logits(peft_model.eval())

    main([
        "push", str(adapter_dir), "me/adapter", "--endpoint", hub.endpoint, "--license", "apache-2.0",
        "--mechanism", "sliding_window:window=4",
    ])
    assert "pushed: " in capsys.readouterr().out
    local = snapshot_download("me/adapter", endpoint=hub.endpoint, cache_dir=tmp_path / "cache")
    card = open(f"{local}/README.md").read()
    assert "PeftModel.from_pretrained" in card and "hf_attn_plus={'window': 4}" in card
    fresh = AutoModelForCausalLM.from_pretrained(base_path, **load_as_card_says)
    torch.testing.assert_close(logits(PeftModel.from_pretrained(fresh, local).eval()), expected, rtol=0, atol=0)
    dense = AutoModelForCausalLM.from_pretrained(base_path)
    assert not torch.equal(logits(PeftModel.from_pretrained(dense, local).eval()), expected)  # the mechanism matters


def test_loading_without_the_plugin_names_the_implementation(tiny_dir):
    path, _ = tiny_dir("llama", "topk")
    code = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({str(path)!r})"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    # transformers' own message: it names the implementation (hence the package) but not the pip command, which
    # is why the model card says "pip install hf_attn_plus" next to this exact error.
    assert 'Specified `attn_implementation="hf_attn_plus:topk"` is not supported' in result.stderr


def test_push_to_an_unreachable_hub_says_what_failed(tiny_dir, base_dir, monkeypatch, capsys):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    path, _ = tiny_dir("llama", "topk")
    endpoint = closed_endpoint()
    with pytest.raises(SystemExit) as exit_info:
        main(["push", str(path), "me/x", "--endpoint", endpoint, "--base-model", str(base_dir)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"could not create repo 'me/x' on {endpoint}" in err and "refused" in err
    assert "nothing was published" in err and "Traceback" not in err


def test_refused_commit_publishes_nothing(tiny_dir, base_dir, hub):
    path, _ = tiny_dir("llama", "topk")
    hub.refuse_commits = True
    card = render_card(path, "me/x", base_model=str(base_dir))
    with pytest.raises(PushError, match=r"(?s)repo 'me/x' exists .* upload of \d+ files failed: .*403.*none of them"):
        push(path, "me/x", card, endpoint=hub.endpoint)
    assert hub.repos == {"me/x": {}}  # the repo was created, empty; no file of the commit reached it
