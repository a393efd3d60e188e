"""The ViT-bigG-style vision tower (`transformer.visual`, docs/qwen-vl.md §4.1-docs/qwen-vl.md §4.4)."""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from workbench.model.resampler import Resampler, get_abs_pos

N_QUERIES = 256  # the release's fixed default: position table rows and resampler queries


class VisualAttention(nn.Module):
    """Self-attention whose packed in_proj is interleaved PER HEAD (Megatron layout):
    rows h*3d + [0,d) are head h's query, [d,2d) its key, [2d,3d) its value."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, width = x.shape
        mixed = self.in_proj(x).view(n, length, self.heads, 3 * self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in mixed.split(self.head_dim, dim=-1))  # [N, H, L, d]
        out = F.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(self.head_dim))
        return self.out_proj(out.transpose(1, 2).reshape(n, length, width))


class VisualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_width: int, eps: float = 1e-6):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.attn = VisualAttention(width, heads)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, mlp_width)),
            ("gelu", nn.GELU()),  # exact erf GELU, not the tanh approximation
            ("c_proj", nn.Linear(mlp_width, width)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TransformerBlock(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float):
        super().__init__()
        mlp_width = int(width * mlp_ratio)  # truncation: 1664 * 4.9231 -> 8192
        self.resblocks = nn.ModuleList(VisualAttentionBlock(width, heads, mlp_width) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class VisionTransformer(nn.Module):
    """pixels [N,3,S,S] -> conv patches + resized positions -> blocks -> attn_pool -> ln_post -> @ proj."""

    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int,
                 mlp_ratio: float, output_dim: int, n_queries: int = N_QUERIES, **_: object):
        super().__init__()
        self.image_size = image_size
        # Own parameters first, then submodules: this reproduces the release's state_dict order.
        self.positional_embedding = nn.Parameter(torch.zeros(n_queries, width))
        self.proj = nn.Parameter(torch.zeros(output_dim, output_dim))
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.ln_pre = nn.LayerNorm(width, eps=1e-6)
        self.transformer = TransformerBlock(width, layers, heads, mlp_ratio)
        # The resampler has output_dim // 128 heads (head dim 128), not `heads`.
        self.attn_pool = Resampler(int(math.sqrt(n_queries)), output_dim, output_dim // 128, kv_dim=width)
        self.ln_post = nn.LayerNorm(output_dim, eps=1e-6)

    def patch_features(self, x: torch.Tensor) -> torch.Tensor:
        """The trunk alone: pixels -> [N, grid*grid, width] patch tokens, before the resampler."""
        x = x.to(dtype=self.conv1.weight.dtype, device=self.conv1.weight.device)
        x = self.conv1(x).flatten(2).transpose(1, 2)  # [N, grid*grid (row-major), width]
        x = x + get_abs_pos(self.positional_embedding, x.size(1))
        return self.transformer(self.ln_pre(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Frozen parts cost nothing extra: where no parameter (LoRA included) can take a gradient,
        # no autograd graph is built, so a frozen ViT keeps no activations for backward.
        grad = torch.is_grad_enabled()
        trunk = (self.conv1, self.ln_pre, self.transformer)
        with torch.set_grad_enabled(grad and (self.positional_embedding.requires_grad or _trainable(*trunk))):
            x = self.patch_features(x)
        with torch.set_grad_enabled(grad and (x.requires_grad or _trainable(self.attn_pool, self.ln_post)
                                              or self.proj.requires_grad)):
            return self.ln_post(self.attn_pool(x)) @ self.proj


def _trainable(*modules: nn.Module) -> bool:
    return any(p.requires_grad for m in modules for p in m.parameters())
