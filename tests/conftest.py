"""Test fixtures: the reference files (tests/reference/, see its README) and the golden outputs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "tests" / "reference"
TINY_REF = REFERENCE / "tiny-qwen-vl-chat"
REAL_REF = REFERENCE / "qwen-vl-chat"
INT4_REF = REFERENCE / "qwen-vl-chat-int4"

# tests/vllm run in vLLM's own environment (`make test-vllm`); the workbench's has no vLLM.
collect_ignore = [] if importlib.util.find_spec("vllm") else ["vllm"]

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
