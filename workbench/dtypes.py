"""Weight dtypes by name: the one map from the names configs and the CLI use to torch dtypes.

The names need no torch, so the command line builds its parser without importing it; the torch maps
(`TORCH_DTYPES`, `FLAG_DTYPES`) are built on first use.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    import torch

Dtype = Literal["bfloat16", "float16", "float32"]  # configs' `dtype:`
DTYPE_NAMES: tuple[str, ...] = get_args(Dtype)  # the CLI's --dtype choices
# The release's config.json flags (bf16/fp16/fp32: true) and transformers' precision names.
PRECISION_FLAGS: dict[str, str] = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


@cache
def _torch_maps() -> dict[str, dict[str, torch.dtype]]:
    import torch

    TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
    FLAG_DTYPES = {flag: TORCH_DTYPES[name] for name, flag in PRECISION_FLAGS.items()}
    return {"TORCH_DTYPES": TORCH_DTYPES, "FLAG_DTYPES": FLAG_DTYPES}


def __getattr__(name: str) -> dict[str, torch.dtype]:  # `from workbench.dtypes import TORCH_DTYPES`
    if name in ("TORCH_DTYPES", "FLAG_DTYPES"):
        return _torch_maps()[name]
    raise AttributeError(f"module 'workbench.dtypes' has no attribute {name!r}")


def dtype_flag(dtype: torch.dtype) -> str:
    """bf16 / fp16 / fp32 for a torch dtype."""
    return next(flag for flag, d in _torch_maps()["FLAG_DTYPES"].items() if d == dtype)
