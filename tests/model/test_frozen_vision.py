"""A frozen vision tower builds no autograd graph; a partly trainable one only where needed."""

from __future__ import annotations

import torch

from workbench import load_model


def test_frozen_parts_build_no_graph(tiny_ref_dir):
    model = load_model(tiny_ref_dir, dtype=torch.float32).train()
    visual = model.transformer.visual
    pixels = torch.randn(1, 3, 56, 56)
    expected = visual(pixels).detach()

    visual.requires_grad_(False)
    assert visual.patch_features(pixels).grad_fn is None
    out = visual(pixels)
    assert out.grad_fn is None and torch.equal(out, expected)

    visual.attn_pool.query.requires_grad_(True)  # resampler trained, trunk frozen
    out = visual(pixels)
    assert out.grad_fn is not None and torch.equal(out.detach(), expected)
    out.sum().backward()
    assert visual.attn_pool.query.grad is not None and visual.conv1.weight.grad is None
