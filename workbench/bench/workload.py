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


def synthetic_batch(config: QWenConfig, seq_len: int, device: torch.device, seed: int = 0) -> dict:
    """One sample of exactly `seq_len` tokens with one image span; the second half is supervised."""
    if seq_len < PROMPT_OFFSET + IMAGE_SPAN + 2:
        raise ValueError(f"seq_len {seq_len} leaves no room for text around a {IMAGE_SPAN}-token image")
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, n_text_tokens(config), (1, seq_len), generator=generator)
    start = config.image_start_id
    ids[0, PROMPT_OFFSET] = start
    ids[0, PROMPT_OFFSET + 1: PROMPT_OFFSET + IMAGE_SPAN - 1] = start + 2  # <imgpad>
    ids[0, PROMPT_OFFSET + IMAGE_SPAN - 1] = start + 1
    labels = ids.clone()
    labels[0, : seq_len // 2] = IGNORE_INDEX
    rgb = np.random.default_rng(seed).integers(0, 256, (IMAGE_WH[1], IMAGE_WH[0], 3), dtype=np.uint8)
    pixels = preprocess(Image.fromarray(rgb), config.visual["image_size"])[None]
    return {"input_ids": ids.to(device), "labels": labels.to(device),
            "attention_mask": torch.ones_like(ids).to(device), "pixel_values": pixels.to(device)}
