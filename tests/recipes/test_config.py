"""Recipe configs: every shipped YAML parses, overrides are typed, unknown keys are errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from common import load_config

from hf_attn_plus import get_mechanism

from .runs import ROOT


RECIPE_CONFIGS = sorted(p for p in (ROOT / "recipes").glob("*/*.yaml") if p.parent.name != "accelerate")


@pytest.mark.parametrize("path", RECIPE_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_configs_parse_with_valid_options(path: Path) -> None:
    cfg = load_config(str(path))
    get_mechanism(cfg.mechanism).resolve_options(cfg.options)
    assert cfg.train.batch_size % cfg.train.grad_accum == 0


def test_overrides_are_typed_and_unknown_keys_rejected() -> None:
    cfg = load_config(None, ["train.steps=7", "train.lr=1e-2", "options.window=16", "lora.target_modules=[q_proj]"])
    assert (cfg.train.steps, cfg.train.lr, cfg.options, cfg.lora.target_modules) == (7, 0.01, {"window": 16}, ["q_proj"])
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['stpes'\] in train\."):
        load_config(None, ["train.stpes=7"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        load_config(None, ["train.steps"])
