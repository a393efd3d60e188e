"""Per-device memory when FSDP or ZeRO-3 shards the model over N devices (`workbench inspect --devices N`).

What is divided: every parameter, its gradient and its AdamW moments are split over the N devices
(FSDP2 `fully_shard`, ZeRO-3), so the single-device total `weights + trainable` becomes 1/N.
What is not: a unit's weights are gathered in full while it computes. With the units
configs/accelerate/fsdp.yaml makes (each QWenBlock and VisualAttentionBlock, accelerate's own
unit for `wte` and its tail unit [`ln_f`, `lm_head`], the root holding everything else):

  gathered = root + max(wte, tail) + 2 x largest block
    root:   stays gathered for the whole step (torch's default for the root unit)
    wte / tail: gathered at the start / end of the forward (the tail through the start of backward)
    2 blocks: the one computing and the next one being gathered (prefetch)
  a unit's bytes: all its parameters unsharded, plus the unsharded gradients of its trainable ones
  per device = ceil((weights + trainable) / N) + gathered            (activations excluded)

ZeRO-3 gathers module by module (a smaller granule than a block) with a prefetch bucket, so its
gathered part is at most this. With N = 1 nothing is sharded and the per-device figure is the total.
"""

from __future__ import annotations

import math

from torch import nn

# The classes configs/accelerate/fsdp.yaml wraps (fsdp_transformer_layer_cls_to_wrap).
WRAP_CLASSES = ("QWenBlock", "VisualAttentionBlock")
WTE, TAIL = ("transformer.wte.",), ("transformer.ln_f.", "lm_head.")

SHARDED_FORMULA = ("per device = (weights + trainable) / N + gathered; gathered = root + max(wte, lm_head+ln_f) "
                   "+ 2 x largest block, each unit's weights (and its trainable grads) in full")


def unit_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of each FSDP unit gathered in full: its parameters plus its trainable parameters' gradients."""
    blocks = {name + "." for name, module in model.named_modules() if type(module).__name__ in WRAP_CLASSES}
    units: dict[str, int] = {"root": 0, "wte": 0, "tail": 0}
    for name, param in model.named_parameters():
        nbytes = param.numel() * param.element_size() * (2 if param.requires_grad else 1)
        block = next((b for b in blocks if name.startswith(b)), None)
        inner = name.split("base_model.model.", 1)[-1]
        unit = block or ("wte" if inner.startswith(WTE) else "tail" if inner.startswith(TAIL) else "root")
        units[unit] = units.get(unit, 0) + nbytes
    return units


def per_device_bytes(units: dict[str, int], total: int, devices: int) -> dict[str, int]:
    """The divided and the gathered part of one device's memory, for `total` = weights + trainable."""
    if devices < 1:
        raise ValueError(f"devices must be at least 1, not {devices}")
    if devices == 1:
        return {"devices": 1, "divided": total, "gathered": 0, "per_device": total}
    blocks = [v for k, v in units.items() if k not in ("root", "wte", "tail")]
    gathered = units["root"] + max(units["wte"], units["tail"]) + 2 * max(blocks, default=0)
    divided = math.ceil(total / devices)
    return {"devices": devices, "divided": divided, "gathered": gathered, "per_device": divided + gathered}
