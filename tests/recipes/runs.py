"""Running a recipe through `accelerate launch` the way a user does, and reading back what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "recipes"))  # the recipe scripts import `common` the way `accelerate launch` runs them

# Seconds-long settings on the tiny teacher: 64-token blocks from the first 30 stdlib files.
TINY_RUN = ["data.seq_len=64", "data.max_documents=30", "data.eval_blocks=8", "train.batch_size=4", "train.warmup_steps=1"]


def run_recipe(
    script: str,
    config: str,
    output_dir: Path,
    overrides: list[str],
    processes: int = 1,
    accelerate_config: str = "",
    stage: str | None = None,
) -> subprocess.CompletedProcess:
    """Run recipes/<script> under `accelerate launch` with recipes/accelerate/<accelerate_config> (default: single.yaml
    for one process, ddp.yaml for more) on gloo CPU processes, with the config's `stages[stage]` when given."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false", HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    accelerate_config = accelerate_config or ("single.yaml" if processes == 1 else "ddp.yaml")
    accelerate = ["--config_file", str(ROOT / "recipes/accelerate" / accelerate_config)]
    if processes > 1:  # without ACCELERATE_USE_CPU each of the processes would train alone (see ddp.yaml)
        accelerate += ["--num_processes", str(processes)]
        env["ACCELERATE_USE_CPU"] = "true"
    sets = [arg for item in [*TINY_RUN, f"train.output_dir={output_dir}", *overrides] for arg in ("--set", item)]
    command = [sys.executable, "-m", "accelerate.commands.launch", *accelerate, str(ROOT / "recipes" / script),
               "--config", str(ROOT / "recipes" / config), *(["--stage", stage] if stage else []), *sets]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def launch(
    script: str, config: str, output_dir: Path, overrides: list[str], processes: int = 1, stage: str | None = None
) -> dict:
    """`run_recipe`, which must succeed; returns summary.json plus the log rows."""
    result = run_recipe(script, config, output_dir, overrides, processes, stage=stage)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    summary = json.loads((output_dir / "summary.json").read_text())
    summary["log"] = [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]
    return summary


def losses(summary: dict) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in summary["log"] if "loss" in row}


def evals(summary: dict) -> list[dict[str, float]]:
    return [row["eval"] for row in summary["log"] if "eval" in row]


def tiny_eval_blocks(tiny_teacher: Path) -> torch.Tensor:
    """The held-out blocks the recipes evaluate on under TINY_RUN."""
    from accelerate import Accelerator
    from common import DataConfig, load_corpus
    from transformers import AutoTokenizer

    data = DataConfig(seq_len=64, max_documents=30, eval_blocks=8)
    return load_corpus(data, AutoTokenizer.from_pretrained(tiny_teacher), Accelerator(cpu=True)).eval_blocks(64, 8)
