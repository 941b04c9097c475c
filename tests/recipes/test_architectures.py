"""The recipes are not Llama-only: LoRA fine-tuning onto a sparse mechanism runs end to end through
`accelerate launch` on tiny Qwen3 and DeepSeek-V3 (MLA) checkpoints that use the teacher's tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_attn_plus.tiny import tiny_config

from .runs import evals, launch, losses


@pytest.mark.parametrize("arch", ["qwen3", "deepseek_v3"])
def test_lora_recipe_runs_on_other_architectures(arch: str, tiny_teacher: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size=len(tokenizer), max_position_embeddings=256))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    run = [f"model={tmp_path / 'model'}", "train.steps=3", "train.eval_every=3", "train.save_every=100",
           "train.lr=0.01", "lora.kl_weight=0.5", "options.window=16"]
    summary = launch("lora_finetune.py", "teacher/sliding_window.yaml", tmp_path / "run", run)
    assert sorted(losses(summary)) == [1, 2, 3]
    before, after = evals(summary)[0]["ppl@64"], evals(summary)[-1]["ppl@64"]
    assert after < before, (before, after)
    assert (tmp_path / "run" / "final" / "adapter_config.json").exists()
