"""Long-context fine-tune through `accelerate launch`: trains on blocks longer than the teacher's, evaluates at each
requested length."""

from __future__ import annotations

from pathlib import Path

from .runs import evals, launch, losses


def test_long_context_finetune_learns_at_the_long_length(tiny_teacher: Path, tmp_path: Path) -> None:
    summary = launch("long_context.py", "teacher/long_sliding_window.yaml", tmp_path, [
        f"model={tiny_teacher}", "long_context.seq_len=128", "long_context.eval_lengths=[64,128]", "options.window=32",
        "train.steps=8", "train.eval_every=8", "train.save_every=100", "train.lr=0.02",
    ])
    assert sorted(losses(summary)) == list(range(1, 9))
    first, last = evals(summary)[0], evals(summary)[-1]
    assert set(first) == {"ppl@64", "ppl@128"}
    assert last["ppl@128"] < first["ppl@128"], (first, last)
    assert set(summary["results"]) >= {"teacher (dense) ppl@128", "sliding_window before ppl@128"}
    assert (tmp_path / "final" / "adapter_model.safetensors").exists()
