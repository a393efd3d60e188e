"""OpenCLIP trunk -> Qwen-VL ViT: the converted ViT computes OpenCLIP's patch features."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import LayerNorm
from open_clip.transformer import VisionTransformer as OpenClipViT

from workbench import load_model
from workbench.convert.openclip import convert_visual_trunk, import_openclip, qkv_blocks_to_per_head
from workbench.errors import CheckpointError
from workbench.model.config import load_config
from workbench.model.vision import VisionTransformer


def openclip_vit(image_size: int = 224, width: int = 32, heads: int = 4) -> OpenClipViT:
    torch.manual_seed(0)
    # eps 1e-6 as in Qwen-VL, so the comparison is exact (OpenCLIP's default is 1e-5).
    vit = OpenClipViT(image_size=image_size, patch_size=14, width=width, layers=2, heads=heads,
                      mlp_ratio=4.9231, output_dim=16, norm_layer=partial(LayerNorm, eps=1e-6))
    with torch.no_grad():  # OpenCLIP leaves biases and norms at 0/1: randomise them too
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vit.eval()


def openclip_patch_tokens(vit: OpenClipViT, pixels: torch.Tensor) -> torch.Tensor:
    """OpenCLIP's own modules on the patch tokens, without the class token Qwen-VL dropped."""
    x = vit.conv1(pixels).flatten(2).transpose(1, 2)
    table = vit.positional_embedding[1:]
    grid, new = int(table.shape[0] ** 0.5), int(x.shape[1] ** 0.5)
    if new != grid:
        table = F.interpolate(table.reshape(1, grid, grid, -1).permute(0, 3, 1, 2), size=(new, new),
                              mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(new * new, -1)
    return vit.transformer(vit.ln_pre(x + table))


def qwen_vit(tiny_ref_dir, converted: dict) -> VisionTransformer:
    config = load_config(tiny_ref_dir)
    vit = VisionTransformer(**config.visual)
    trunk = {k.removeprefix("transformer.visual."): v for k, v in converted.items()}
    missing, unexpected = vit.load_state_dict(trunk, strict=False)
    assert not unexpected and all(k.startswith(("attn_pool", "ln_post", "proj")) for k in missing)
    return vit.eval()


def test_per_head_reorder_by_hand():
    # 2 heads of dim 1: [q0 q1 k0 k1 v0 v1] -> [q0 k0 v0 q1 k1 v1]
    packed = torch.tensor([10.0, 11.0, 20.0, 21.0, 30.0, 31.0])
    assert qkv_blocks_to_per_head(packed, heads=2).tolist() == [10, 20, 30, 11, 21, 31]


@pytest.mark.parametrize("image_size", [224, 448])  # native 16x16 grid, and a larger 32x32 one
def test_patch_features_equal_openclip(tiny_ref_dir, image_size):
    source = openclip_vit()
    vit = qwen_vit(tiny_ref_dir, convert_visual_trunk(source))
    pixels = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        ours, theirs = vit.patch_features(pixels), openclip_patch_tokens(source, pixels)
    assert ours.shape == (2, (image_size // 14) ** 2, 32)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_other_grid_is_resized_to_16x16(tiny_ref_dir):
    source = openclip_vit(image_size=112)  # 8x8 grid
    table = convert_visual_trunk(source)["transformer.visual.positional_embedding"]
    grid = source.positional_embedding[1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False)
    torch.testing.assert_close(table, expected.permute(0, 2, 3, 1).reshape(256, -1))


def test_import_writes_a_loadable_model(tiny_ref_dir, tmp_path):
    source = openclip_vit()
    out = import_openclip(source, tiny_ref_dir, tmp_path / "vit-import", resampler="fresh", llm="base")
    model, base = load_model(out, dtype=torch.float32), load_model(tiny_ref_dir, dtype=torch.float32)
    ours, ref = model.state_dict(), base.state_dict()
    for key, tensor in convert_visual_trunk(source).items():
        assert torch.equal(ours[key], tensor), key
    for key in ref:
        if key.startswith("transformer.visual.attn_pool.query"):
            assert not torch.equal(ours[key], ref[key])  # fresh
        elif not key.startswith("transformer.visual."):
            assert torch.equal(ours[key], ref[key]), key  # LLM copied bit for bit
    torch.testing.assert_close(ours["transformer.visual.attn_pool.pos_embed"],
                               ref["transformer.visual.attn_pool.pos_embed"])  # the fixed sin-cos table
    assert (out / "qwen.tiktoken").is_file() and not (tmp_path / ".vit-import.tmp").exists()


def test_import_refuses_wrong_width(tiny_ref_dir, tmp_path):
    with pytest.raises(CheckpointError, match="width 48 \\(config: 32\\)"):
        import_openclip(openclip_vit(width=48), tiny_ref_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()
