"""DSA indexer training through `accelerate launch`: the warm-up lowers the indexer KL while the main model stays
frozen, and the sparse stage continues from the warm-up's output with LoRA + the selected-set KL."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from .runs import evals, launch, losses

CONFIG = "teacher/indexer_topk.yaml"
TINY = ["options.budget=8", "options.window=4", "options.index_dim=16", "train.eval_every=100", "train.save_every=100"]


@pytest.fixture(scope="module")
def warmup(tiny_teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    output_dir = tmp_path_factory.mktemp("indexer-warmup")
    run = [f"model={tiny_teacher}", *TINY, "train.steps=8", "train.lr=0.01"]
    return launch("indexer_training.py", CONFIG, output_dir, run), output_dir


def test_warmup_lowers_the_indexer_kl_and_trains_only_the_indexer(warmup, tiny_teacher: Path) -> None:
    summary, output_dir = warmup
    first, last = evals(summary)[0], evals(summary)[-1]
    assert last["objective"] < 0.9 * first["objective"], (first, last)
    trained = AutoModelForCausalLM.from_pretrained(output_dir / "final")
    base = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    for name, parameter in trained.named_parameters():
        if ".attn_plus." not in name:
            assert torch.equal(parameter, base.get_parameter(name)), name


def test_sparse_stage_continues_from_the_warmup(warmup, tmp_path: Path) -> None:
    """The documented command, `--stage sparse` (which sets options.stage), on the warm-up's output."""
    _, warm_dir = warmup
    run = [f"model={warm_dir / 'final'}", *TINY, "train.steps=3", "train.lr=0.005"]
    summary = launch("indexer_training.py", CONFIG, tmp_path, run, stage="sparse")
    assert all(torch.isfinite(torch.tensor(loss)) for loss in losses(summary).values())
    assert (tmp_path / "final" / "adapter_config.json").exists()
