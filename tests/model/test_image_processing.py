"""Preprocessing reproduces the release's pixel tensors (PIL bicubic squash + CLIP normalisation)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from workbench.errors import WorkbenchError
from workbench.model.image_processing import load_image, preprocess


@pytest.mark.parametrize("name", ["a", "b", "c", "d"])  # RGB, RGBA, palette, grayscale
def test_pixels_match_golden(tiny_ref_dir, name):
    cases = load_file(tiny_ref_dir / "cases.safetensors")
    pixels = preprocess(load_image(f"images/{name}.png", root=tiny_ref_dir), 56)
    torch.testing.assert_close(pixels, cases[f"pixel_values.{name}"][0], atol=1e-6, rtol=0)


def test_missing_image_names_the_path(tmp_path):
    with pytest.raises(WorkbenchError, match=r"image not found: images/nope\.png"):
        load_image("images/nope.png", root=tmp_path)
