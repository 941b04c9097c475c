"""The embedded default teacher: corpus split, determinism, cache reuse, and a saved model that is what it claims."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_attn_plus import teacher
from hf_attn_plus.teacher import TINY_SPEC, heldout_blocks, perplexity, stdlib_files, stdlib_texts, teacher_path

from .runs import tiny_eval_blocks


def test_heldout_split_is_by_file_and_covers_the_corpus() -> None:
    files = stdlib_files()
    assert files == sorted(files, key=lambda p: p.as_posix()) and len(files) > 100
    assert not any("site-packages" in p.parts or "test" in p.parts for p in files)
    train, heldout = stdlib_texts("train"), stdlib_texts("heldout")
    assert len(train) + len(heldout) == len(files)
    assert len(heldout) == len(files) // 10
    assert not set(train) & set(heldout) - {""}
    with pytest.raises(ValueError, match="'train' or 'heldout'"):
        stdlib_texts("test")


def test_training_is_deterministic(tmp_path: Path) -> None:
    spec = dataclasses.replace(TINY_SPEC, steps=3, max_files=5, eval_blocks=2)
    first, second = teacher.train_teacher(spec, tmp_path / "a", 0), teacher.train_teacher(spec, tmp_path / "b", 0)
    assert first["heldout_perplexity"] == second["heldout_perplexity"]
    assert (tmp_path / "a/tokenizer.json").read_text() == (tmp_path / "b/tokenizer.json").read_text()
    a, b = load_file(tmp_path / "a/model.safetensors"), load_file(tmp_path / "b/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cached_teacher_is_reused(tiny_teacher: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object) -> None:
        raise AssertionError("retrained a cached teacher")

    monkeypatch.setattr(teacher, "train_teacher", fail)
    assert teacher_path(TINY_SPEC, tiny_teacher.parent) == tiny_teacher
    assert tiny_teacher.name.startswith("teacher-") and tiny_teacher.name.endswith(teacher.TeacherSpec().key[-6:])


def test_saved_teacher_reloads_and_matches_its_reported_perplexity(tiny_teacher: Path) -> None:
    summary = json.loads((tiny_teacher / "teacher.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher)
    text = stdlib_texts("heldout")[0][:2000]
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # byte-level: any text round-trips
    blocks = heldout_blocks(tokenizer, TINY_SPEC.seq_len, TINY_SPEC.eval_blocks)
    ppl = perplexity(model, blocks)
    assert ppl == pytest.approx(summary["heldout_perplexity"], rel=1e-5)
    assert ppl < 0.5 * len(tokenizer)  # far better than a uniform guess: it learned from the corpus


def test_recipes_evaluate_on_the_teachers_heldout_text(tiny_teacher: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher)
    torch.testing.assert_close(tiny_eval_blocks(tiny_teacher), heldout_blocks(tokenizer, 64, 8))
