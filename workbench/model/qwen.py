"""The Qwen-7B decoder pieces (docs/qwen-vl.md §5.2-docs/qwen-vl.md §5.6): RMSNorm, rotary with dynamic NTK, log-n, attention, MLP.

Attention runs through `F.scaled_dot_product_attention` with the release's ADDITIVE float
masks (finfo.min, not -inf and not boolean: padded query rows then stay finite exactly as in
the original) and an explicit scale of 1/sqrt(d) rounded through the model dtype (the release
divides by a 0-d tensor of the model dtype, which is 11.3125 rather than 11.3137 in bf16).

Packed batches (`segment_ids`) never build a mask: `Segments` holds each row's runs of equal
segment id, and `segment_attention` runs plain causal attention per run (runs of one length are
stacked into one SDPA call), so no [L, L] tensor of the row length L is ever made.

`PromptKV` lets many rows continue one prompt (GRPO's G answers per prompt) with the prompt run
once: its forward records each layer's keys and values, `expand(G)` repeats them, and the
answers' forward reads them in front of its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


@dataclass(frozen=True, eq=False)
class Segments:
    """The runs of equal segment id in a packed batch [B, S] (padding, id 0, is a run of its own:
    its outputs are never read, they stay finite and see no real token).

    `runs[b]` is row b's ((start, length), ...). `groups` maps a run length to the flat indices
    (b * S + position) of all runs of that length, [n, length]; `inverse` puts the outputs of the
    groups, concatenated in `groups` order, back in flat order; `cu_seqlens` (int32) are the run
    boundaries in flat order, as flash-attn's varlen kernels take them.
    """

    runs: tuple[tuple[tuple[int, int], ...], ...]
    groups: dict[int, torch.Tensor]
    inverse: torch.Tensor
    cu_seqlens: torch.Tensor
    max_length: int

    @classmethod
    def from_ids(cls, segment_ids: torch.Tensor) -> Segments:
        batch, width = segment_ids.shape
        ids = segment_ids.tolist()  # one sync; the runs are host-side bookkeeping
        runs = tuple(_runs(row) for row in ids)
        by_length: dict[int, list[int]] = {}
        for b, row_runs in enumerate(runs):
            for start, length in row_runs:
                by_length.setdefault(length, []).append(b * width + start)
        device = segment_ids.device
        groups = {n: (torch.tensor(starts, device=device)[:, None] + torch.arange(n, device=device))
                  for n, starts in sorted(by_length.items())}
        order = torch.cat([g.flatten() for g in groups.values()])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=device)
        lengths = [n for row_runs in runs for _, n in row_runs]
        cu = torch.tensor([0, *lengths], device=device).cumsum(0).to(torch.int32)
        return cls(runs, groups, inverse, cu, max(lengths))


def _runs(row: list[int]) -> tuple[tuple[int, int], ...]:
    """(start, length) of each maximal stretch of equal ids."""
    out, start = [], 0
    for i in range(1, len(row) + 1):
        if i == len(row) or row[i] != row[start]:
            out.append((start, i - start))
            start = i
    return tuple(out)


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments,
                      scale: float, dropout_p: float) -> torch.Tensor:
    """Causal attention inside each run: [B, H, S, d] in, [B, H, S, d] out."""
    b, h, s, d = q.shape
    q, k, v = (t.transpose(1, 2).reshape(b * s, h, d) for t in (q, k, v))  # flat [B*S, H, d]
    if _use_flash_varlen(q):
        out = _flash_varlen(q, k, v, segments, scale, dropout_p)
    else:
        outs = []
        for n, idx in segments.groups.items():
            qg, kg, vg = (t[idx].transpose(1, 2) for t in (q, k, v))  # [runs, H, n, d]
            og = F.scaled_dot_product_attention(qg, kg, vg, is_causal=n > 1, scale=scale, dropout_p=dropout_p)
            outs.append(og.transpose(1, 2).reshape(-1, h, d))
        out = torch.cat(outs)[segments.inverse]
    return out.view(b, s, h, d).transpose(1, 2)


def _use_flash_varlen(q: torch.Tensor) -> bool:
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)):
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def _flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments,
                  scale: float, dropout_p: float) -> torch.Tensor:
    """UNTESTED here (no CUDA, no flash-attn on the CI machine): the runs are contiguous in flat
    order, so the flat tensors go in as they are, with the run boundaries as cu_seqlens."""
    from flash_attn import flash_attn_varlen_func

    cu = segments.cu_seqlens
    return flash_attn_varlen_func(q, k, v, cu, cu, segments.max_length, segments.max_length,
                                  dropout_p=dropout_p, softmax_scale=scale, causal=True)


class PromptKV:
    """Post-RoPE keys and values of a batch of prompts, per layer.

    Unlike a KV `Cache` it is never appended to: a recording one is filled by the prompts' forward
    (a gradient-checkpointing replay overwrites an entry with the same tensors), and `expand(G)`
    returns a reading one that the answers' forward puts in front of its own keys. So both forwards
    keep their autograd graphs and run under checkpointing, where a Cache is dropped (a replay would
    append twice). Rows: prompt b's copies are rows b*G .. b*G+G-1, as `repeat_interleave`.
    """

    def __init__(self, kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None, ntk_alpha: float = 1.0):
        self.reading = kv is not None
        self.kv = kv if kv is not None else {}
        self.ntk_alpha = ntk_alpha  # the prompts' NTK alpha, which the answers continue with (as decoding)

    @property
    def length(self) -> int:
        """How many positions the answers' forward finds in front of it (0 while recording)."""
        return next(iter(self.kv.values()))[0].shape[2] if self.reading else 0

    def __call__(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.reading:
            self.kv[layer] = (k, v)
            return k, v
        pk, pv = self.kv[layer]
        return torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)

    def expand(self, repeats: int) -> PromptKV:
        if self.reading or not self.kv:
            raise ValueError("expand() needs the keys and values a prompts' forward recorded")
        return PromptKV({layer: (k.repeat_interleave(repeats, 0), v.repeat_interleave(repeats, 0))
                         for layer, (k, v) in self.kv.items()}, self.ntk_alpha)


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
                attention_mask: torch.Tensor | Segments | None, logn: torch.Tensor | None,
                past_key_values: Cache | None, prompt_kv: PromptKV | None = None) -> torch.Tensor:
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
        if prompt_kv is not None:
            k, v = prompt_kv(self.layer_idx, k, v)
        scale = 1.0 / torch.tensor(math.sqrt(self.head_dim), dtype=q.dtype).item()
        dropout_p = self.attn_dropout if self.training else 0.0
        if isinstance(attention_mask, Segments):  # packed: causal attention inside each segment
            out = segment_attention(q, k, v, attention_mask, scale, dropout_p)
            return self.c_proj(out.transpose(1, 2).reshape(b, s, self.projection_size))
        # No mask for several queries means plain causal attention from position 0 (a prefill without
        # padding or packing: see modeling.attention_pattern); one query (decoding) sees every key.
        causal = attention_mask is None and s > 1
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, is_causal=causal, scale=scale,
                                             dropout_p=dropout_p)
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
                attention_mask: torch.Tensor | Segments | None, logn: torch.Tensor | None = None,
                past_key_values: Cache | None = None, prompt_kv: PromptKV | None = None) -> torch.Tensor:
        h = x + self.attn(self.ln_1(x), rotary, attention_mask, logn, past_key_values, prompt_kv)
        return h + self.mlp(self.ln_2(h))
