"""Attention transfer (LoLCATs stage 1): what it trains, and runs through `accelerate launch` in one and two
processes (the per-layer pairs themselves are tested with hf_attn_plus.distill in tests/linear)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from attention_transfer import AttentionTransfer
from common import MECHANISM_WEIGHTS, train_only_mechanism_weights
from transformers import AutoModelForCausalLM

import hf_attn_plus  # noqa: F401
from hf_attn_plus.teacher import perplexity

from .runs import evals, launch, losses, tiny_eval_blocks

CONFIG = "teacher/linear.yaml"
RUN = ["train.steps=5", "train.eval_every=5", "train.save_every=100", "train.lr=0.02"]


def _load(path: Path, mechanism: str, **options) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=f"hf_attn_plus:{mechanism}", hf_attn_plus=options)


def _tokens(model: torch.nn.Module, length: int = 48) -> torch.Tensor:
    return torch.randint(3, model.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(0))


def test_only_mechanism_weights_train(tiny_teacher: Path) -> None:
    model = _load(tiny_teacher, "linear", feature_map="hedgehog")
    train_only_mechanism_weights(model, "linear")
    AttentionTransfer(model)(_tokens(model))["loss"].backward()
    for name, parameter in model.named_parameters():
        assert (parameter.grad is not None) == (MECHANISM_WEIGHTS in name), name
    with pytest.raises(ValueError, match="adds no weights"):
        train_only_mechanism_weights(_load(tiny_teacher, "sliding_window"), "sliding_window")


@pytest.fixture(scope="module")
def one_process(tiny_teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    output_dir = tmp_path_factory.mktemp("transfer")
    return launch("attention_transfer.py", CONFIG, output_dir, [f"model={tiny_teacher}", *RUN]), output_dir


def test_transfer_reduces_the_attention_mismatch(one_process: tuple[dict, Path]) -> None:
    summary, _ = one_process
    first, last = evals(summary)[0], evals(summary)[-1]
    assert last["attention_mse"] < 0.9 * first["attention_mse"], (first, last)


def test_distilled_model_reloads_with_its_trained_weights(one_process: tuple[dict, Path], tiny_teacher: Path) -> None:
    summary, output_dir = one_process
    distilled = AutoModelForCausalLM.from_pretrained(output_dir / "final")
    untrained = _load(tiny_teacher, "linear", feature_map="hedgehog")
    trained = {n: p for n, p in distilled.named_parameters() if MECHANISM_WEIGHTS in n}
    assert trained and all(not torch.equal(p, untrained.get_parameter(n)) for n, p in trained.items())
    blocks = tiny_eval_blocks(tiny_teacher)
    assert perplexity(distilled, blocks) == pytest.approx(summary["results"]["linear distilled ppl"], rel=1e-4)


def test_two_processes_follow_the_one_process_trajectory(
    one_process: tuple[dict, Path], tiny_teacher: Path, tmp_path: Path
) -> None:
    summary, _ = one_process
    two = launch("attention_transfer.py", CONFIG, tmp_path, [f"model={tiny_teacher}", *RUN], processes=2)
    assert two["processes"] == 2
    # The global batch of a step does not depend on the process count: only the float reduction order differs.
    one_losses, two_losses = losses(summary), losses(two)
    assert sorted(two_losses) == sorted(one_losses)
    for step, loss in one_losses.items():
        assert two_losses[step] == pytest.approx(loss, rel=1e-4), step
