"""The Qwen-7B decoder pieces (docs/qwen-vl.md §5.2-docs/qwen-vl.md §5.6): RMSNorm, rotary with dynamic NTK, log-n, attention, MLP.

Attention runs through `F.scaled_dot_product_attention` with the release's ADDITIVE float
masks (finfo.min, not -inf and not boolean: padded query rows then stay finite exactly as in
the original) and an explicit scale of 1/sqrt(d) rounded through the model dtype (the release
divides by a 0-d tensor of the model dtype, which is 11.3125 rather than 11.3137 in bf16).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer

from workbench.model.config import QWenConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight  # cast BEFORE the weight multiply, as the release


def ntk_alpha(seq_len: int, train_len: int) -> int:
    """Dynamic NTK factor for an eval prefill of seq_len tokens: 1, 3, 7, 15, ..."""
    return max(2 ** math.ceil(math.log2(seq_len / train_len) + 1) - 1, 1)


def rotary_table(positions: torch.Tensor, rot_dim: int, base: float, alpha: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, S, 1, rot_dim] (float32) for integer positions [B, S]."""
    base = base * alpha ** (rot_dim / (rot_dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, device=positions.device).float() / rot_dim))
    freqs = positions.float().unsqueeze(-1) * inv_freq  # == torch.outer(pos, inv_freq) per row
    emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(2)
    return emb.cos(), emb.sin()


def apply_rotary(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GPT-NeoX rotate-half on the first rot_dim channels, in float32, cast back."""
    rot_dim = cos.shape[-1]
    t_rot, t_pass = t[..., :rot_dim].float(), t[..., rot_dim:].float()
    x1, x2 = t_rot.chunk(2, dim=-1)
    t_rot = t_rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((t_rot, t_pass), dim=-1).type_as(t)


def logn_factors(start: int, length: int, seq_length: int, device: torch.device) -> torch.Tensor:
    """[length] factors for absolute positions start..start+length-1: log(p+1)/log(seq_length) past seq_length."""
    values = [math.log(p + 1, seq_length) if p + 1 > seq_length else 1.0 for p in range(start, start + length)]
    return torch.tensor(values, dtype=torch.float32, device=device)


class QWenAttention(nn.Module):
    def __init__(self, config: QWenConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = config.num_attention_heads, config.kv_channels
        self.projection_size = self.num_heads * self.head_dim
        self.c_attn = nn.Linear(config.hidden_size, 3 * self.projection_size)  # contiguous q | k | v, with bias
        self.c_proj = nn.Linear(self.projection_size, config.hidden_size, bias=not config.no_bias)
        self.attn_dropout = config.attn_dropout_prob

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None, logn: torch.Tensor | None,
                past_key_values: Cache | None) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.c_attn(x).split(self.projection_size, dim=2)
        q, k, v = (t.view(b, s, self.num_heads, self.head_dim) for t in (q, k, v))
        cos, sin = rotary
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if logn is not None:
            q = q * logn.to(q.dtype)[None, :, None, None]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, d]
        if past_key_values is not None:  # the cache holds post-RoPE keys
            k, v = past_key_values.update(k, v, self.layer_idx)
        scale = 1.0 / torch.tensor(math.sqrt(self.head_dim), dtype=q.dtype).item()
        # No mask for several queries means plain causal attention from position 0 (a prefill without
        # padding or packing: see modeling.additive_mask); one query (decoding) sees every key.
        causal = attention_mask is None and s > 1
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, is_causal=causal, scale=scale,
                                             dropout_p=self.attn_dropout if self.training else 0.0)
        return self.c_proj(out.transpose(1, 2).reshape(b, s, self.projection_size))


class QWenMLP(nn.Module):
    def __init__(self, config: QWenConfig):
        super().__init__()
        width = config.intermediate_size // 2  # the release uses half of intermediate_size
        self.w1 = nn.Linear(config.hidden_size, width, bias=not config.no_bias)
        self.w2 = nn.Linear(config.hidden_size, width, bias=not config.no_bias)
        self.c_proj = nn.Linear(width, config.hidden_size, bias=not config.no_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))  # the gate is w2


class QWenBlock(GradientCheckpointingLayer):
    def __init__(self, config: QWenConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = QWenAttention(config, layer_idx)
        self.ln_2 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = QWenMLP(config)

    def forward(self, x: torch.Tensor, *, rotary: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None, logn: torch.Tensor | None = None,
                past_key_values: Cache | None = None) -> torch.Tensor:
        h = x + self.attn(self.ln_1(x), rotary, attention_mask, logn, past_key_values)
        return h + self.mlp(self.ln_2(h))
