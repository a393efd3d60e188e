"""`--verify`: the merged model must give the logits of base + adapter (PeftModel) on a probe batch.

The probe has an image (pixel_values), so ViT and resampler adapters are exercised as well as the
LLM's. Both models run in the merged checkpoint's dtype, one after the other (peak: one model).

Tolerances, on max |logit difference| relative to the logit scale max(1, max |reference logit|):
float32 1e-4 (both sides compute the same function; only summation order differs), float16 1e-2
and bfloat16 5e-2 (the merged weights are W + ΔW rounded once to 8 or 11 significant bits, while
the adapter model adds an unrounded ΔW·x; 8-bit rounding of every weight moves logits by about
1% of their scale). The 16-bit bounds are chosen from that estimate, not measured on the 9.6B model.
"""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from workbench.errors import WorkbenchError

TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
PROBE_TEXT = "Picture 1: <img>probe.png</img>\nWhat is in this picture? Answer with a box."


def probe_batch(model_dir: Path, image_size: int) -> dict[str, torch.Tensor]:
    """A fixed one-image batch: seeded noise image, ChatML-free prompt, same on every call."""
    from workbench import load_tokenizer
    from workbench.model.image_processing import preprocess

    tok = load_tokenizer(model_dir)
    pixels = np.random.default_rng(0).integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
    return {"input_ids": torch.tensor([tok(PROBE_TEXT).input_ids]),
            "pixel_values": preprocess(Image.fromarray(pixels), image_size)[None]}


def adapter_logits(base_dir: Path, adapter_dir: Path, batch: dict, dtype: torch.dtype,
                   device: str) -> torch.Tensor:
    """Logits of the base with the adapter applied by PEFT (unmerged), the reference."""
    from peft import PeftModel

    from workbench import load_model

    model = PeftModel.from_pretrained(load_model(base_dir, dtype=dtype, device=device), adapter_dir)
    return _logits(model.eval(), batch, device)


def merged_logits(merged_dir: Path, batch: dict, dtype: torch.dtype, device: str) -> torch.Tensor:
    from workbench import load_model

    return _logits(load_model(merged_dir, dtype=dtype, device=device), batch, device)


@torch.no_grad()
def _logits(model: torch.nn.Module, batch: dict, device: str) -> torch.Tensor:
    dtype = next(model.parameters()).dtype
    logits = model(input_ids=batch["input_ids"].to(device),
                   pixel_values=batch["pixel_values"].to(device, dtype)).logits.float().cpu()
    del model
    gc.collect()  # free one model before the next one loads
    return logits


def verify_merge(base_dir: Path, adapter_dir: Path, merged_dir: Path, device: str = "cpu") -> dict:
    """Compare merged vs adapter logits; raises WorkbenchError above the dtype's tolerance."""
    from workbench.model.config import load_config

    config = load_config(merged_dir)
    # config.json's torch_dtype is the merged weights' dtype (merge updates it with --dtype);
    # comparing in it makes the check see the rounding of the merged weights.
    dtype = config.dtype or torch.float32
    batch = probe_batch(merged_dir, config.visual["image_size"])
    reference = adapter_logits(base_dir, adapter_dir, batch, dtype, device)
    merged = merged_logits(merged_dir, batch, dtype, device)
    diff = (merged - reference).abs().max().item()
    scale = max(1.0, reference.abs().max().item())
    result = {"dtype": str(dtype).removeprefix("torch."), "max_abs_logit_diff": diff,
              "logit_scale": scale, "tolerance": TOLERANCE[dtype] * scale,
              "probe_tokens": int(batch["input_ids"].shape[1]), "passed": diff <= TOLERANCE[dtype] * scale}
    if not result["passed"]:
        raise WorkbenchError(
            f"verify failed: merged logits differ from base + adapter by {diff:.3g} "
            f"(tolerance {TOLERANCE[dtype] * scale:.3g} for {result['dtype']}); the merge was not written")
    return result

