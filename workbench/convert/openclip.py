"""Import an OpenCLIP visual trunk into Qwen-VL's ViT layout.

The paper (arXiv 2308.12966, §2.1) initialises Qwen-VL's ViT from OpenCLIP's ViT-bigG-14 and
drops what OpenCLIP puts around the trunk: the class token and its position row, and the
pooling head (OpenCLIP's `ln_post` and `proj`; Qwen-VL's own `ln_post` and `proj` sit after the
resampler). What changes on the way:

* `positional_embedding`: the class row is dropped and the patch grid is resized to Qwen-VL's
  fixed 16x16 table when OpenCLIP's grid differs (float32 bicubic, as `get_abs_pos`).
* `attn.in_proj_weight` / `in_proj_bias`: OpenCLIP's `nn.MultiheadAttention` packs [q; k; v]
  as three contiguous blocks; Qwen-VL's `attn.in_proj` interleaves them per head
  (rows h*3d + [0,d) query, [d,2d) key, [2d,3d) value).
* Everything else (conv1, ln_pre, ln_1/ln_2, out_proj, mlp.c_fc/c_proj) keeps its tensor.

OpenCLIP's LayerNorm uses eps 1e-5 and Qwen-VL's 1e-6; the released Qwen-VL kept 1e-6 after
importing, and so does this importer (the weights are unchanged, only the epsilon differs).
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from workbench.errors import CheckpointError, first_line
from workbench.model.checkpoint import (
    copy_non_weight_files,
    iter_shards,
    parse_size,
    resolve_model_dir,
    shard_files,
)
from workbench.model.config import QWenConfig, load_config
from workbench.model.resampler import get_2d_sincos_pos_embed, get_abs_pos
from workbench.model.shard_writer import ShardWriter, TensorSpec
from workbench.model.vision import N_QUERIES

VISUAL = "transformer.visual."
TRUNK = re.compile(r"transformer\.visual\.(conv1|positional_embedding|ln_pre|transformer\.resblocks)\b")
RESAMPLER = re.compile(r"transformer\.visual\.(attn_pool|ln_post|proj)\b")


def qkv_blocks_to_per_head(packed: torch.Tensor, heads: int) -> torch.Tensor:
    """[q; k; v] row blocks ([3W, ...]) -> per-head interleaved rows [q_h; k_h; v_h] for h = 0..heads-1."""
    rest = packed.shape[1:]
    head_dim = packed.shape[0] // (3 * heads)
    return packed.reshape(3, heads, head_dim, *rest).transpose(0, 1).reshape(packed.shape)


def convert_visual_trunk(visual: nn.Module) -> dict[str, torch.Tensor]:
    """An OpenCLIP `VisionTransformer` -> Qwen-VL ViT trunk tensors (release key names)."""
    state = visual.state_dict()
    heads = visual.transformer.resblocks[0].attn.num_heads
    out = {"conv1.weight": state["conv1.weight"],
           "positional_embedding": get_abs_pos(state["positional_embedding"][1:], N_QUERIES).clone(),
           "ln_pre.weight": state["ln_pre.weight"], "ln_pre.bias": state["ln_pre.bias"]}
    for key, tensor in state.items():
        if not key.startswith("transformer.resblocks."):
            continue
        if key.endswith("attn.in_proj_weight") or key.endswith("attn.in_proj_bias"):
            name = key.replace("in_proj_weight", "in_proj.weight").replace("in_proj_bias", "in_proj.bias")
            out[name] = qkv_blocks_to_per_head(tensor, heads)
        elif not key.split(".")[3].startswith("ls_"):  # layer scale does not exist in ViT-bigG
            out[key] = tensor
    return {VISUAL + k: v for k, v in out.items()}


def check_compatible(visual: nn.Module, config: QWenConfig) -> None:
    """The trunk's sizes must be the ones the Qwen-VL config expects (grid size may differ)."""
    blocks = visual.transformer.resblocks
    found = {"width": visual.conv1.out_channels, "layers": len(blocks),
             "heads": blocks[0].attn.num_heads, "patch_size": visual.conv1.kernel_size[0],
             "mlp width": blocks[0].mlp.c_fc.out_features}
    want = {"width": config.visual["width"], "layers": config.visual["layers"],
            "heads": config.visual["heads"], "patch_size": config.visual["patch_size"],
            "mlp width": int(config.visual["width"] * config.visual["mlp_ratio"])}
    wrong = [f"{k} {found[k]} (config: {want[k]})" for k in want if found[k] != want[k]]
    if wrong:
        raise CheckpointError(f"the OpenCLIP trunk does not fit the Qwen-VL config: {', '.join(wrong)}")


def fresh_tensor(key: str, shape: torch.Size, config: QWenConfig, generator: torch.Generator) -> torch.Tensor:
    """Initial value of a tensor that is not taken from any checkpoint (norms 1, biases 0, N(0, 0.02))."""
    if key.endswith("attn_pool.pos_embed"):
        grid = int(shape[0] ** 0.5)
        return torch.from_numpy(get_2d_sincos_pos_embed(shape[1], grid)).float()
    if key.endswith(".bias"):
        return torch.zeros(shape)
    if len(shape) == 1 and re.search(r"\.(ln_\w+|ln_f)\.weight$", key):
        return torch.ones(shape)
    return torch.randn(shape, generator=generator) * config.initializer_range


def load_openclip_visual(model_name: str, weights: str | os.PathLike | None) -> nn.Module:
    """OpenCLIP's vision tower by registry name, with weights from a local file (no download)."""
    import open_clip

    try:
        model = open_clip.create_model(model_name, pretrained=str(weights) if weights else None)
    except pickle.UnpicklingError as e:  # weights-only loading refused a Python object: nothing ran
        raise CheckpointError(f"{weights}: holds pickled Python objects, not only tensors, and was not loaded "
                              f"({first_line(e, 120)})") from None
    except (RuntimeError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights}: OpenCLIP could not load it as {model_name} ({first_line(e)})") from None
    return model.visual


def expected_shapes(config: QWenConfig) -> dict[str, torch.Size]:
    from workbench.model.modeling import QWenLMHeadModel

    with torch.device("meta"):
        model = QWenLMHeadModel(config)
    return {k: v.shape for k, v in model.state_dict().items()}


def import_openclip(visual: nn.Module, base: str | os.PathLike, out_dir: str | os.PathLike, *,
                    resampler: str = "base", llm: str = "base", seed: int = 0,
                    max_shard_size: str | int = "2GB") -> Path:
    """Write a full Qwen-VL model folder whose ViT trunk comes from `visual`.

    `base` is a Qwen-VL folder (or hub id): its config and tokenizer files are copied, and the
    resampler (`attn_pool`, `ln_post`, `proj`) and the LLM come from its weights ("base") or from
    a fresh initialisation ("fresh"). Written to a temporary folder and renamed at the end.
    """
    for name, choice in (("resampler", resampler), ("llm", llm)):
        if choice not in ("base", "fresh"):
            raise CheckpointError(f"--{name} must be 'base' or 'fresh', not {choice!r}")
    base_dir = resolve_model_dir(base)
    config = load_config(base_dir)
    check_compatible(visual, config)
    trunk = convert_visual_trunk(visual)
    shapes = expected_shapes(config)
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise CheckpointError(f"{out_dir}: already exists; choose a new output folder")
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    for key, tensor in trunk.items():
        if tensor.shape != shapes[key]:
            raise CheckpointError(f"converted {key} has shape {tuple(tensor.shape)}, the config needs "
                                  f"{tuple(shapes[key])}")
    dtype = config.dtype or torch.bfloat16  # the release's stored dtype (config.json torch_dtype)
    generator = torch.Generator().manual_seed(seed)

    def source(key: str) -> str:
        if TRUNK.match(key):
            return "openclip"
        return resampler if RESAMPLER.match(key) else llm

    base_keys = [k for _, keys in shard_files(base_dir) for k in keys if source(k) == "base" and k in shapes]
    order = [k for k in shapes if source(k) == "fresh"] + base_keys + list(trunk)
    writer = ShardWriter(tmp, [TensorSpec(k, dtype, tuple(shapes[k])) for k in order], parse_size(max_shard_size))
    for key in (k for k in shapes if source(k) == "fresh"):
        writer.add(key, fresh_tensor(key, shapes[key], config, generator).to(dtype))
    if "base" in (resampler, llm):
        for _, tensors in tqdm(iter_shards(base_dir), desc="copying base weights", unit="shard"):
            for key, tensor in tensors.items():
                if source(key) == "base" and key in shapes:
                    writer.add(key, tensor.to(dtype))
    for key, tensor in trunk.items():
        writer.add(key, tensor.to(dtype))
    writer.close()
    copy_non_weight_files(base_dir, tmp)
    tmp.rename(out_dir)
    return out_dir
