"""The supported-model table of the README, read off the model-level tests: which mechanisms run on which model types.

    python docs/supported_models.py > docs/supported_models.md

It collects (does not run) the model-level test files and keeps every test whose parameters name a model type of
`tests/core/models.py`; the mechanism is a parameter too, or the one the file tests. A cell lists the mechanisms of
one family with at least one such test on that model type.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import hf_attn_plus  # noqa: E402
from core.models import MODEL_TYPES  # noqa: E402

# Files whose tests are parametrized by model type; the mechanism of those naming none in their parameters.
TEST_FILES = {
    "tests/core/test_models.py": None,
    "tests/selection/test_santa.py": "santa",
    "tests/selection/test_lighthouse.py": "lighthouse",
    "tests/selection/test_stochastic_routing.py": "stochastic_routing",
    "tests/selection/test_head_budget.py": "head_budget",
    "tests/selection/test_indexer_topk_models.py": "indexer_topk",
    "tests/linear/test_linear_models.py": None,
}


def covered() -> dict[str, set[str]]:
    """model type -> mechanisms with a model-level test on it."""
    listing = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *TEST_FILES],
        cwd=ROOT, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    ).stdout
    names = {m["name"] for m in hf_attn_plus.mechanisms()}
    found: dict[str, set[str]] = defaultdict(set)
    for line in listing.splitlines():
        path, _, test = line.partition("::")
        if "[" not in test or path not in TEST_FILES:
            continue
        params = set(test[test.index("[") + 1 : -1].split("-"))
        mechanisms = (params & names) or {TEST_FILES[path]} - {None}
        for model_type in params & set(MODEL_TYPES):
            found[model_type] |= mechanisms
    return found


def table() -> str:
    families = sorted({m["family"] for m in hf_attn_plus.mechanisms()})
    family_of = {m["name"]: m["family"] for m in hf_attn_plus.mechanisms()}
    found = covered()
    rows = ["| model type | " + " | ".join(families) + " |", "|---" * (len(families) + 1) + "|"]
    for model_type in MODEL_TYPES:
        cells = [", ".join(sorted(n for n in found[model_type] if family_of[n] == f)) or "–" for f in families]
        rows.append(f"| `{model_type}` | " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
