"""Shared test fixtures: where the reference files are, and the golden outputs.

The reference folder lies beside the repository (`../shared/reference`), both here and in CI.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("WORKBENCH_SHARED", REPO.parent / "shared"))
TINY_REF = SHARED / "reference" / "tiny-qwen-vl-chat"
REAL_REF = SHARED / "reference" / "qwen-vl-chat"

# One thread per test process: the goldens were made with one thread, and `make test` runs
# two pytest workers on two cores.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_ref_dir() -> Path:
    assert TINY_REF.is_dir(), f"reference folder missing: {TINY_REF}"
    return TINY_REF


@pytest.fixture(scope="session")
def real_ref_dir() -> Path:
    assert REAL_REF.is_dir(), f"reference folder missing: {REAL_REF}"
    return REAL_REF


@pytest.fixture(scope="session")
def golden() -> dict:
    return json.loads((TINY_REF / "golden.json").read_text())
