"""One tiny teacher per test session (seconds to train), shared by every recipe test."""

from __future__ import annotations

from pathlib import Path

import pytest

from hf_attn_plus.teacher import TINY_SPEC, teacher_path

from . import runs  # noqa: F401  (puts recipes/ on sys.path)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return teacher_path(TINY_SPEC, tmp_path_factory.mktemp("cache"))


