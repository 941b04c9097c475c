"""Shared fixtures: one tiny teacher per session and a helper that runs a recipe through `accelerate launch`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from hf_attn_plus.teacher import TINY_SPEC, teacher_path

from .runs import ROOT

sys.path.insert(0, str(ROOT / "recipes"))  # the recipe scripts import `common` the way `accelerate launch` runs them


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return teacher_path(TINY_SPEC, tmp_path_factory.mktemp("cache"))


