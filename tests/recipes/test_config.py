"""Recipe configs: every shipped YAML parses, overrides are typed, unknown keys are errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from common import load_config

from hf_attn_plus import get_mechanism

from .runs import ROOT


RECIPE_CONFIGS = sorted(p for p in (ROOT / "recipes").glob("*/*.yaml") if p.parent.name != "accelerate")


@pytest.mark.parametrize("path", RECIPE_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_configs_parse_with_valid_options(path: Path) -> None:
    for stage in [None, *(yaml.safe_load(path.read_text()).get("stages") or {})]:
        cfg = load_config(str(path), stage=stage)
        get_mechanism(cfg.mechanism).resolve_options(cfg.options)
        assert cfg.train.batch_size % cfg.train.grad_accum == 0


def test_overrides_are_typed_and_unknown_keys_rejected() -> None:
    cfg = load_config(None, ["train.steps=7", "train.lr=1e-2", "options.window=16", "lora.target_modules=[q_proj]"])
    assert (cfg.train.steps, cfg.train.lr, cfg.options, cfg.lora.target_modules) == (7, 0.01, {"window": 16}, ["q_proj"])
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['stpes'\] in train\."):
        load_config(None, ["train.stpes=7"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        load_config(None, ["train.steps"])


def test_a_stage_is_merged_over_the_file_and_set_has_the_last_word() -> None:
    path = str(ROOT / "recipes/smollm2/hybrid.yaml")
    base, lora = load_config(path), load_config(path, stage="lora")
    assert (base.model, base.train.steps, base.train.lr) == ("smollm2", 300, 1e-2)
    assert (lora.model, lora.train.steps, lora.train.lr) == ("runs/smollm2/hybrid/final", 450, 1e-3)
    # Keys the stage leaves alone keep the file's values, inside a section as well as outside.
    assert (lora.train.batch_size, lora.options, lora.lora) == (base.train.batch_size, base.options, base.lora)
    assert load_config(path, ["train.steps=5", "model=elsewhere"], stage="lora").train.steps == 5
    sparse = load_config(str(ROOT / "recipes/smollm2/indexer_topk.yaml"), stage="sparse")
    assert sparse.options == {**load_config(str(ROOT / "recipes/smollm2/indexer_topk.yaml")).options, "stage": "sparse"}


def test_bad_stages_are_named() -> None:
    path = str(ROOT / "recipes/smollm2/hybrid.yaml")
    with pytest.raises(ValueError, match=r"--stage 'sparse' is not a stage of .*hybrid.yaml; its stages: \['lora'\]"):
        load_config(path, stage="sparse")
    with pytest.raises(ValueError, match="its stages: none"):
        load_config(str(ROOT / "recipes/smollm2/dense_lora_baseline.yaml"), stage="lora")
    with pytest.raises(ValueError, match="choose a stage with --stage"):
        load_config(path, ["stages.lora.train.steps=5"])
