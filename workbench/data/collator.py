"""Batches of SFTDataset items: dynamic right padding to the longest row of the batch.

The attention mask marks real tokens (1) and padding (0) by position, not by `ids != pad` as
finetune.py does, so a genuine `<|endoftext|>` in the data stays visible.
"""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence

from workbench.model.modeling import IGNORE_INDEX


class SFTCollator:
    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        width = max(len(it["input_ids"]) for it in items)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": _pad([it["input_ids"] for it in items], width, self.pad_token_id),
            "labels": _pad([it["labels"] for it in items], width, IGNORE_INDEX),
            "attention_mask": _pad([torch.ones(len(it["input_ids"])) for it in items], width, 0),
        }
        if any("segment_ids" in it for it in items):
            # An unpacked item in a packed batch is one segment.
            batch["segment_ids"] = _pad([it.get("segment_ids", torch.ones(len(it["input_ids"]))) for it in items],
                                        width, 0)
        # Image k of the batch belongs to the k-th <img> span in (row, position) order.
        pixels = [it["pixel_values"] for it in items if "pixel_values" in it and len(it["pixel_values"])]
        if pixels:
            batch["pixel_values"] = torch.cat(pixels).float()
        # Cached ViT output (data.vit_cache), in the dtype the visual module gave it: cast as the model would.
        features = [it["image_features"] for it in items if "image_features" in it]
        if features:
            batch["image_features"] = torch.cat(features)
        return batch


def _pad(rows: list[torch.Tensor], width: int, value: int) -> torch.Tensor:
    """Right-pad int64 rows to the longest, then on to `width` (pad_to_multiple_of)."""
    batch = pad_sequence([r.long() for r in rows], batch_first=True, padding_value=value)
    return torch.nn.functional.pad(batch, (0, width - batch.shape[1]), value=value)
