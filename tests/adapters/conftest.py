"""Fixtures: models on the meta device (full size and tiny), the loaded tiny model, recipe files."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

from workbench.adapters.inspect import meta_model


@pytest.fixture(scope="session")
def full_meta(real_ref_dir: Path) -> torch.nn.Module:
    """The 9.6B release on the meta device (resolve only; PEFT would modify it)."""
    return meta_model(real_ref_dir)


@pytest.fixture(scope="session")
def tiny_meta(tiny_ref_dir: Path) -> torch.nn.Module:
    return meta_model(tiny_ref_dir)


@pytest.fixture(scope="session")
def _tiny_loaded(tiny_ref_dir: Path) -> torch.nn.Module:
    import workbench

    return workbench.load_model(tiny_ref_dir, dtype=torch.float32)


@pytest.fixture
def tiny(_tiny_loaded: torch.nn.Module) -> torch.nn.Module:
    """A fresh copy of the tiny reference model (tests wrap and quantise it in place)."""
    return copy.deepcopy(_tiny_loaded)


@pytest.fixture
def write_recipe(tmp_path: Path):
    """write_recipe(dict) -> path of a recipe YAML holding it."""
    def write(data: dict, name: str = "recipe") -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path
    return write
