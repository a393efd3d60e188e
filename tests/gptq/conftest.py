"""The tiny reference model quantised once per session (GPTQ 4-bit, group size 64, 32 samples)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import TINY_REF

SAMPLES = 32


@pytest.fixture(scope="session")
def calib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 shapes records with one image each, as `workbench demo` makes them."""
    from workbench.demo.synthetic import make_shapes_dataset

    return make_shapes_dataset(tmp_path_factory.mktemp("calib"), SAMPLES, seed=0, name="train")


@pytest.fixture(scope="session")
def int4_model(tmp_path_factory: pytest.TempPathFactory, calib: Path) -> Path:
    from workbench.gptq.layout import GPTQSpec
    from workbench.gptq.quantize import quantize

    out = tmp_path_factory.mktemp("int4") / "model"
    quantize(TINY_REF, calib, out, GPTQSpec(group_size=64), samples=SAMPLES)
    return out
