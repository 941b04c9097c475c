"""Every recipes/smollm2/*.yaml runs end to end through `accelerate launch` on SmolLM2's real architecture, weights
and tokenizer, cut to its first two layers (seconds per step instead of minutes): the losses are finite, the
held-out evaluation runs, and the output reloads as a transformers model on its mechanism."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

import hf_attn_plus
from hf_attn_plus.smollm2 import load_smollm2

from .runs import ROOT, evals, launch, losses

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
        ("indexer_training.py", "smollm2/indexer_topk_from_attention.yaml", None),  # sparse stage: an adapter
        ("lora_finetune.py", "smollm2/head_budget.yaml", None),
        ("lora_finetune.py", "smollm2/head_budget_duo.yaml", None),
        ("lora_finetune.py", "smollm2/dense_lora_baseline.yaml", None),
    ],
)
def test_recipe_runs_on_the_real_architecture(script, config, reloads, smollm2_slice: Path, tmp_path: Path) -> None:
    summary = launch(script, config, tmp_path / "run", [f"model={smollm2_slice}", *SHORT])
    assert sorted(losses(summary)) == [1, 2] and all(torch.isfinite(torch.tensor(list(losses(summary).values()))))
    assert evals(summary)
    if reloads:
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / reloads)
        mechanism = yaml.safe_load((ROOT / "recipes" / config).read_text())["mechanism"]
        assert model.config._attn_implementation == hf_attn_plus.get_mechanism(mechanism).attn_implementation
        with torch.no_grad():
            assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()


def test_evaluate_sweeps_a_budget_over_a_trained_adapter(smollm2_slice: Path, tmp_path: Path) -> None:
    """recipes/evaluate.py on the head_budget recipe's adapter: one row per budget, the dense row is the base model's
    own SDPA perplexity, and the mean gate and the share of heads computed grow with the budget up to 1 at budget 1."""
    import json
    import os
    import subprocess
    import sys

    from .runs import ROOT

    launch("lora_finetune.py", "smollm2/head_budget.yaml", tmp_path / "run", [f"model={smollm2_slice}", *SHORT])
    out = tmp_path / "eval.json"
    command = [
        sys.executable, str(ROOT / "recipes/evaluate.py"), "--config", str(ROOT / "recipes/smollm2/head_budget.yaml"),
        "--set", f"model={smollm2_slice}", "--set", "data.seq_len=64", "--set", "data.eval_blocks=2",
        "--adapter", str(tmp_path / "run" / "final"), "--grid", "options.budget=0.25,0.5,1.0",
        "--needle-length", "64", "--json", str(out),
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(out.read_text())
    assert [row["options"]["budget"] for row in report["results"]] == [0.25, 0.5, 1.0]
    for column in ("mean gate", "heads computed"):
        kept = [row[column] for row in report["results"]]
        assert kept == sorted(kept) and kept[-1] == pytest.approx(1.0), column
    assert all(row["heads computed"] >= row["heads on"] >= row["mean gate"] for row in report["results"])
    assert all(0.0 <= row["needle@64"] <= 1.0 for row in report["results"])

    from accelerate import Accelerator
    from common import DataConfig, load_corpus, perplexity
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_slice)
    blocks = load_corpus(DataConfig(seq_len=64, eval_blocks=2), tokenizer, Accelerator(cpu=True)).eval_blocks(64, 2)
    base = AutoModelForCausalLM.from_pretrained(smollm2_slice, attn_implementation="sdpa")
    assert report["dense (adapters off)"]["ppl@64"] == pytest.approx(perplexity(Accelerator(cpu=True), base, blocks), rel=1e-5)


def test_two_processes_follow_one_on_the_real_architecture(smollm2_slice: Path, tmp_path: Path) -> None:
    """DDP (2 gloo CPU processes) on SmolLM2's architecture and tokenizer: the hybrid LoRA stage (KL to the dense
    model) follows the 1-process losses and trains the same adapter."""
    from safetensors.torch import load_file

    overrides = [f"model={smollm2_slice}", *SHORT, "lora.merge=false"]
    one = launch("lora_finetune.py", "smollm2/hybrid.yaml", tmp_path / "one", overrides)
    two = launch("lora_finetune.py", "smollm2/hybrid.yaml", tmp_path / "two", overrides, processes=2)
    assert (one["processes"], two["processes"]) == (1, 2)
    assert sorted(losses(two)) == sorted(losses(one))
    for step, loss in losses(one).items():
        assert losses(two)[step] == pytest.approx(loss, rel=1e-4), step
    adapters = [load_file(tmp_path / run / "final" / "adapter_model.safetensors") for run in ("one", "two")]
    assert adapters[0].keys() == adapters[1].keys()
    for name, weight in adapters[0].items():
        torch.testing.assert_close(adapters[1][name], weight, rtol=1e-4, atol=1e-5, msg=name)
    assert any(w.abs().max() > 0 for n, w in adapters[0].items() if "lora_B" in n)
