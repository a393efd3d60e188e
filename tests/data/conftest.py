"""Fixtures for the SFT data tests: the reference tokenizer, a folder with the reference images,
and a writer for small data files in it."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from workbench.model.tokenizer import QWenTokenizer


@pytest.fixture(scope="session")
def tok(tiny_ref_dir: Path) -> QWenTokenizer:
    return QWenTokenizer.from_pretrained(tiny_ref_dir)


@pytest.fixture
def data_dir(tmp_path: Path, tiny_ref_dir: Path) -> Path:
    """tmp_path/images/{a,b,c,d}.png: a 80x60, b 40x90, c 33x47, d 120x50 (W x H)."""
    shutil.copytree(tiny_ref_dir / "images", tmp_path / "images")
    return tmp_path


@pytest.fixture
def write_data(data_dir: Path) -> Callable[..., Path]:
    def write(rows: list, name: str = "train.jsonl") -> Path:
        path = data_dir / name
        if name.endswith(".jsonl"):
            path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
        else:
            path.write_text(json.dumps(rows))
        return path
    return write
