"""Every recipes/smollm2/*.yaml runs end to end through `accelerate launch` on SmolLM2's real architecture, weights
and tokenizer, cut to its first two layers (seconds per step instead of minutes): the losses are finite, the
held-out evaluation runs, and the output reloads as a transformers model on its mechanism."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_attn_plus
from hf_attn_plus.smollm2 import load_smollm2

from .runs import evals, launch, losses

SHORT = ["train.steps=2", "train.eval_every=2", "train.save_every=100", "data.seq_len=64", "data.eval_blocks=2",
         "train.batch_size=2"]


@pytest.fixture(scope="module")
def smollm2_slice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, tokenizer = load_smollm2(num_layers=2)
    path = tmp_path_factory.mktemp("smollm2") / "two-layers"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "script, config, reloads",
    [
        ("attention_transfer.py", "smollm2/hybrid.yaml", "final"),
        ("attention_transfer.py", "smollm2/gated_delta.yaml", "final"),
        ("indexer_training.py", "smollm2/indexer_topk.yaml", "final"),
        ("lora_finetune.py", "smollm2/head_budget.yaml", None),
    ],
)
def test_recipe_runs_on_the_real_architecture(script, config, reloads, smollm2_slice: Path, tmp_path: Path) -> None:
    summary = launch(script, config, tmp_path / "run", [f"model={smollm2_slice}", *SHORT])
    assert sorted(losses(summary)) == [1, 2] and all(torch.isfinite(torch.tensor(list(losses(summary).values()))))
    assert evals(summary)
    if reloads:
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / reloads)
        mechanism = config.split("/")[1].removesuffix(".yaml")
        assert model.config._attn_implementation == hf_attn_plus.get_mechanism(mechanism).attn_implementation
        with torch.no_grad():
            assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()
