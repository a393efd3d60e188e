"""The benchmark's workload: the official LoRA recipe's training step on random weights of the real size.

One sample per micro-batch, one 640x480 image per sample, every position a real token (no padding),
gradient accumulation over 8 micro-batches, bf16, gradient checkpointing, AdamW: the setting in
which the original Qwen-VL-Chat code was measured (BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image

from workbench.demo.tiny import TINY_CONFIG
from workbench.model.config import QWenConfig
from workbench.model.image_processing import preprocess
from workbench.model.modeling import IGNORE_INDEX

IMAGE_WH = (640, 480)
IMAGE_SPAN = 258  # <img> + 256 slots + </img>
PROMPT_OFFSET = 8  # text tokens before the image span
TINY_N_TOKENS = 256 + 217  # the byte-level tiny vocabulary: 256 bytes + the special tokens


def bench_config(tiny: bool) -> QWenConfig:
    """The release's config (the QWenConfig defaults), or the built-in tiny model's."""
    if not tiny:
        return QWenConfig()
    eod = TINY_N_TOKENS - 217
    # 8 ViT blocks: enough for every shipped recipe's layer selection (e.g. "last 8").
    visual = {**TINY_CONFIG["visual"], "image_start_id": eod + 214, "layers": 8}
    return QWenConfig(**{**TINY_CONFIG, "fp32": False, "visual": visual,
                         "vocab_size": math.ceil(TINY_N_TOKENS / 128) * 128})


def n_text_tokens(config: QWenConfig) -> int:
    """Ids that are plain text: below <|endoftext|>, which sits 214 below <img>."""
    return config.image_start_id - 214


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def random_image(seed: int) -> Image.Image:
    """The workload's image: IMAGE_WH of uniform noise (no two seeds alike, so no cache can dedupe them)."""
    rgb = np.random.default_rng(seed).integers(0, 256, (IMAGE_WH[1], IMAGE_WH[0], 3), dtype=np.uint8)
    return Image.fromarray(rgb)


def sample_ids(config: QWenConfig, seq_len: int, supervised: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [seq_len] of random text with one image span after PROMPT_OFFSET text tokens, and labels
    that supervise the last `supervised` positions."""
    if seq_len < PROMPT_OFFSET + IMAGE_SPAN + 2:
        raise ValueError(f"seq_len {seq_len} leaves no room for text around a {IMAGE_SPAN}-token image")
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, n_text_tokens(config), (seq_len,), generator=generator)
    start = config.image_start_id
    ids[PROMPT_OFFSET] = start
    ids[PROMPT_OFFSET + 1: PROMPT_OFFSET + IMAGE_SPAN - 1] = start + 2  # <imgpad>
    ids[PROMPT_OFFSET + IMAGE_SPAN - 1] = start + 1
    labels = ids.clone()
    labels[: seq_len - supervised] = IGNORE_INDEX
    return ids, labels


def synthetic_batch(config: QWenConfig, seq_len: int, device: torch.device, seed: int = 0) -> dict:
    """One sample of exactly `seq_len` tokens with one image span; the second half is supervised."""
    ids, labels = sample_ids(config, seq_len, seq_len - seq_len // 2, seed)
    pixels = preprocess(random_image(seed), config.visual["image_size"])[None]
    return {"input_ids": ids[None].to(device), "labels": labels[None].to(device),
            "attention_mask": torch.ones_like(ids)[None].to(device), "pixel_values": pixels.to(device)}
