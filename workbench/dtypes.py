"""Weight dtypes by name: the one map from the names configs and the CLI use to torch dtypes."""

from __future__ import annotations

from typing import Literal, get_args

import torch

Dtype = Literal["bfloat16", "float16", "float32"]  # configs' `dtype:`; the CLI's --dtype choices are its keys
TORCH_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in get_args(Dtype)}
# The release's config.json flags (bf16/fp16/fp32: true) and transformers' precision names.
PRECISION_FLAGS: dict[str, str] = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
FLAG_DTYPES: dict[str, torch.dtype] = {flag: TORCH_DTYPES[name] for name, flag in PRECISION_FLAGS.items()}


def dtype_flag(dtype: torch.dtype) -> str:
    """bf16 / fp16 / fp32 for a torch dtype."""
    return next(flag for flag, d in FLAG_DTYPES.items() if d == dtype)
