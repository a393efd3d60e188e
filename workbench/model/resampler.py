"""The position-aware cross-attention resampler (`attn_pool`, docs/qwen-vl.md §4.5) and its position tables.

256 learned queries attend once over the ViT patch tokens. `attn` is a real
`nn.MultiheadAttention` so that PEFT can put LoRA on it (the release uses one too, with its
contiguous q|k|v `in_proj_weight`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def get_1d_sincos_pos_embed(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """[len(pos), embed_dim] = [sin(p*w_k) ..., cos(p*w_k) ...], float32 numpy math like the release."""
    omega = np.arange(embed_dim // 2, dtype=np.float32)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """[grid^2, embed_dim]; the first half encodes the COLUMN index (the release meshes w first)."""
    grid = np.arange(grid_size, dtype=np.float32)
    col, row = np.meshgrid(grid, grid)
    return np.concatenate([get_1d_sincos_pos_embed(embed_dim // 2, col),
                           get_1d_sincos_pos_embed(embed_dim // 2, row)], axis=1)


def get_abs_pos(abs_pos: torch.Tensor, tgt_len: int) -> torch.Tensor:
    """Resize a square [L, C] position table to tgt_len rows: float32 bicubic, then cast back."""
    src, tgt = int(math.sqrt(abs_pos.size(0))), int(math.sqrt(tgt_len))
    if src == tgt:
        return abs_pos
    grid = abs_pos.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(tgt, tgt), mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1).flatten(0, 2).to(dtype=abs_pos.dtype)


class Resampler(nn.Module):
    def __init__(self, grid_size: int, embed_dim: int, num_heads: int, kv_dim: int, eps: float = 1e-6):
        super().__init__()
        # Registration order = the release's state_dict order.
        table = torch.tensor(get_2d_sincos_pos_embed(embed_dim, grid_size), dtype=torch.float32)
        self.pos_embed = nn.Parameter(table, requires_grad=False)  # fixed, but stored in the checkpoint
        self.query = nn.Parameter(torch.zeros(grid_size**2, embed_dim))
        # Identity (no weight, no state-dict key) when the ViT width already equals output_dim.
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim != embed_dim else nn.Identity()
        self.attn = nn.MultiheadAttention(embed_dim, num_heads)
        self.ln_q = nn.LayerNorm(embed_dim, eps=eps)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, L, kv_dim] -> [N, num_queries, embed_dim]."""
        pos_k = get_abs_pos(self.pos_embed, x.size(1))
        kv = self.ln_kv(self.kv_proj(x)).permute(1, 0, 2)  # sequence-first, as nn.MultiheadAttention wants
        q = self.ln_q(self.query).unsqueeze(1).expand(-1, kv.shape[1], -1)
        # Queries take the unresized table, keys the resized one, values none (docs/qwen-vl.md §4.5).
        out = self.attn(q + self.pos_embed.unsqueeze(1), kv + pos_k.unsqueeze(1), kv, need_weights=False)[0]
        return out.permute(1, 0, 2)
