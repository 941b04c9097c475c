"""recipes/layer_errors.py: per-layer relative error of a mechanism's attention against dense attention."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from layer_errors import layer_errors
from transformers import AutoModelForCausalLM

import hf_attn_plus  # noqa: F401  (registers the mechanisms)

from .runs import ROOT, TINY_RUN


def _model(path: Path, mechanism: str, **options) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(
        path, attn_implementation=f"hf_attn_plus:{mechanism}", hf_attn_plus=options
    ).eval()


def test_exact_layers_score_zero_and_approximate_ones_do_not(tiny_teacher: Path) -> None:
    ids = torch.randint(3, 200, (2, 48), generator=torch.Generator().manual_seed(0))
    covering = layer_errors(_model(tiny_teacher, "sliding_window", window=64, sinks=0), ids)
    assert len(covering) == 2 and max(covering) < 1e-10, covering  # the tiny teacher's 2 layers
    hybrid = layer_errors(_model(tiny_teacher, "hybrid", window=8), ids)
    assert min(hybrid) > 1e-4, hybrid
    # Layers left to the model's own attention by `layers` are dense: zero there, the same error elsewhere.
    some = layer_errors(_model(tiny_teacher, "hybrid", window=8, layers=[1]), ids)
    assert some[0] < 1e-10
    torch.testing.assert_close(torch.tensor(some[1]), torch.tensor(hybrid[1]))


def test_the_command_names_the_worst_layers(tiny_teacher: Path, tmp_path: Path) -> None:
    sets = [arg for item in [*TINY_RUN, f"model={tiny_teacher}"] for arg in ("--set", item)]
    command = [sys.executable, str(ROOT / "recipes/layer_errors.py"), "--config", str(ROOT / "recipes/teacher/hybrid.yaml"),
               *sets, "--blocks", "2", "--keep-dense", "1", "--json", str(tmp_path / "out.json")]
    result = subprocess.run(command, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out.json").read_text())
    errors = report["relative_mse"]
    assert report["worst_first"][0] == max(range(len(errors)), key=errors.__getitem__)
    assert report["keep_dense"] == report["worst_first"][:1]
    assert report["layers"] == [i for i in range(len(errors)) if i not in report["keep_dense"]]
    bad = subprocess.run([*command, "--keep-dense", "2"], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "--keep-dense=2: allowed 0 to 1" in bad.stderr
