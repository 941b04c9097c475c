"""Running a recipe through `accelerate launch` the way a user does, and reading back what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Seconds-long settings on the tiny teacher: 64-token blocks from the first 30 stdlib files.
TINY_RUN = ["data.seq_len=64", "data.max_documents=30", "data.eval_blocks=8", "train.batch_size=4", "train.warmup_steps=1"]


def launch(script: str, config: str, output_dir: Path, overrides: list[str], processes: int = 1) -> dict:
    """Run recipes/<script> under `accelerate launch`; returns summary.json plus the log rows."""
    if processes == 1:
        accelerate = ["--config_file", str(ROOT / "recipes/accelerate/single.yaml")]
    else:  # `--cpu --num_processes 2` would silently run one process; --multi_gpu becomes MULTI_CPU without GPUs
        accelerate = ["--multi_gpu", "--num_processes", str(processes), "--main_process_port", "29517"]
    sets = [arg for item in [*TINY_RUN, f"train.output_dir={output_dir}", *overrides] for arg in ("--set", item)]
    command = [sys.executable, "-m", "accelerate.commands.launch", *accelerate, str(ROOT / "recipes" / script),
               "--config", str(ROOT / "recipes" / config), *sets]
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false", HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    summary = json.loads((output_dir / "summary.json").read_text())
    summary["log"] = [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]
    return summary


def losses(summary: dict) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in summary["log"] if "loss" in row}


def evals(summary: dict) -> list[dict[str, float]]:
    return [row["eval"] for row in summary["log"] if "eval" in row]
