"""A hand-set vision side for the tiny demo model: what pretraining gives the real Qwen-VL.

The real ViT and resampler arrive pretrained: their 256 image tokens say what is where. A random
tiny ViT says nothing usable, and pretraining one does not fit in the demo's minutes, so
`set_shape_vision` writes weights by hand that do the same job for the synthetic shapes of
workbench.demo.synthetic (flat colours on grey textures). Only the vision side is set; the LLM
stays random, and it is the LLM that a demo or test run has to teach to read these tokens.

What each part computes (ViT width 64, resampler width 128, a 16 x 16 patch grid):
  conv1       per patch, one linear colour score per palette colour (`COLOUR_SCORES`, on the
              patch's mean RGB), e.g. red = R - G: grey scores 0, the colour itself scores high
  pos table   a sin/cos code of the patch's column and row (`POSITION_FREQS`, cycles per image),
              its negation (so every row sums to 0 and the LayerNorms are near identity) and a
              constant pair (so the norm is the same for every patch)
  block 0     MLP: presence of each colour = the score clamped to [0, 1] between 55 % and 85 %
              of the full colour's score (two GELU units each: relu(z) - relu(z - 1))
  block 1     MLP: the position code gated by presence: `gelu(A(p - 1/2) + x) - gelu(A(p - 1/2) - x)`
              is 2x where a colour is present (p = 1) and ~0 on the background (p = 0)
  resampler   queries = the 2D sin-cos table's high frequencies, and q/k projections that keep
              only those, so query i attends to patch i alone (`KEY_SHARPNESS`); values carry
              presence, gated position and a constant, placed in the table's LOW-frequency
              dimensions, which q/k drop: training the LayerNorms or queries cannot move the
              attention off its patch
  ln_post     with proj = I: each image token is LayerNorm([presence, gated position, constant])

So an image token is a constant on the background and "colour c is here, at (x, y)" on a shape.
Attention blocks of the ViT are zero (patches do not mix).
"""

from __future__ import annotations

import math

import torch

from workbench.errors import WorkbenchError
from workbench.model.image_processing import CLIP_MEAN, CLIP_STD

# Linear colour scores on raw RGB in [0, 1]; each is high for its colour and low for the others
# and for grey (yellow = R + G - 2B: yellow 1.41, red 0.71, green 0.35 -> thresholds at 55 %+).
COLOUR_SCORES = {"red": (1, -1, 0), "green": (-1, 1, 0), "blue": (-1, 0, 1), "yellow": (1, 1, -2)}
PRESENCE_RANGE = (0.55, 0.85)  # fraction of the full colour's score: presence 0 below, 1 above
POSITION_FREQS = (0.25, 0.5, 1.0, 2.0)  # cycles per image: coarse-to-fine sin/cos per axis
UNIT_SHARPNESS = 10.0  # GELU inputs this large behave like ReLU
KEY_SHARPNESS = 10.0   # resampler q and k projections: this * (high-frequency selector)
PRESENCE_GAIN = 2.0    # presence outweighs a single position feature in the image tokens

# ViT residual-stream layout (width 64).
SCORE, PRESENCE, GATED, POS, CONST, NEG_POS = 0, 4, 8, 24, 40, 42
N_POS = 4 * len(POSITION_FREQS)  # sin and cos, per frequency, per axis
# The code and its negation are 2 * 8 sin/cos pairs (norm^2 16); with the constant pair the norm^2
# is 16 + 2 * 24 = 64 = width: std 1 and mean 0, so the ViT's LayerNorms leave the stream as it is.
CONST_VALUE = math.sqrt(24)


def position_code(grid: int) -> torch.Tensor:
    """[grid * grid, N_POS]: sin/cos of each patch centre's column, then of its row (row-major patches)."""
    u = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    code = torch.stack([f(2 * math.pi * freq * u) for freq in POSITION_FREQS for f in (torch.sin, torch.cos)], 1)
    return torch.cat([code.repeat(grid, 1), code.repeat_interleave(grid, 0)], 1).float()


def _check_sizes(visual: torch.nn.Module, colours: dict) -> None:
    width = visual.conv1.out_channels
    grid = math.isqrt(visual.positional_embedding.shape[0])
    if (width, len(visual.transformer.resblocks), visual.attn_pool.attn.embed_dim) != (64, 2, 128) \
            or visual.image_size != grid * visual.conv1.kernel_size[0]:
        raise WorkbenchError("set_shape_vision needs a ViT of width 64 with 2 blocks, a resampler of width 128 "
                             "and one patch per query (image_size = 16 * patch_size)")
    unknown = set(colours) - set(COLOUR_SCORES)
    if unknown:
        raise WorkbenchError(f"set_shape_vision has no colour score for {sorted(unknown)}")


@torch.no_grad()
def set_shape_vision(model: torch.nn.Module, colours: dict[str, tuple[int, int, int]]) -> None:
    """Overwrite `model.transformer.visual` in place (see the module docstring); the LLM is untouched."""
    visual = model.transformer.visual
    _check_sizes(visual, colours)
    for name, param in visual.named_parameters():
        if not name.endswith("attn_pool.pos_embed"):  # the fixed sin-cos table stays
            param.zero_()
    _set_trunk(visual, colours)
    _set_resampler(visual.attn_pool, len(colours))
    visual.ln_post.weight.fill_(1.0)
    visual.proj.copy_(torch.eye(visual.proj.shape[0]))


def _set_trunk(visual: torch.nn.Module, colours: dict) -> None:
    patch = visual.conv1.kernel_size[0]
    grid = math.isqrt(visual.positional_embedding.shape[0])
    code = position_code(grid)
    visual.positional_embedding[:, POS:POS + N_POS] = code
    visual.positional_embedding[:, NEG_POS:NEG_POS + N_POS] = -code
    visual.positional_embedding[:, CONST:CONST + 2] = torch.tensor([CONST_VALUE, -CONST_VALUE])
    norms = [visual.ln_pre] + [ln for block in visual.transformer.resblocks for ln in (block.ln_1, block.ln_2)]
    for ln in norms:
        ln.weight.fill_(1.0)
    presence_mlp, gate_mlp = (block.mlp for block in visual.transformer.resblocks)
    for c, (name, rgb) in enumerate(colours.items()):
        coef = COLOUR_SCORES[name]
        # conv1 sees CLIP-normalised pixels: raw = x * std + mean, so the mean goes into the bias below.
        for ch in range(3):
            visual.conv1.weight[SCORE + c, ch] = coef[ch] * CLIP_STD[ch] / patch**2
        offset = sum(coef[ch] * CLIP_MEAN[ch] for ch in range(3))
        full = sum(coef[ch] * rgb[ch] / 255 for ch in range(3))
        lo, hi = (frac * full for frac in PRESENCE_RANGE)
        slope = UNIT_SHARPNESS / (hi - lo)
        for unit, shift, sign in ((2 * c, 0.0, 1.0), (2 * c + 1, -UNIT_SHARPNESS, -1.0)):
            presence_mlp.c_fc.weight[unit, SCORE + c] = slope
            presence_mlp.c_fc.bias[unit] = slope * (offset - lo) + shift
            presence_mlp.c_proj.weight[PRESENCE + c, unit] = sign / UNIT_SHARPNESS
    for k in range(N_POS):
        for unit, sign in ((2 * k, 1.0), (2 * k + 1, -1.0)):
            gate_mlp.c_fc.weight[unit, PRESENCE:PRESENCE + len(colours)] = UNIT_SHARPNESS
            gate_mlp.c_fc.weight[unit, POS + k] = sign
            gate_mlp.c_fc.bias[unit] = -UNIT_SHARPNESS / 2
            gate_mlp.c_proj.weight[GATED + k, unit] = sign / 2


def _set_resampler(pool: torch.nn.Module, n_colours: int) -> None:
    width = pool.attn.embed_dim
    # The 2D table's dims: [column sin 32 | column cos 32 | row sin 32 | row cos 32], frequency
    # falling within each block. The first 16 of each block tell neighbouring patches apart; the
    # last 16 barely vary across 16 patches, so the values go there and q/k ignore them.
    high = torch.zeros(width)
    for start in range(0, width, width // 4):
        high[start:start + width // 8] = 1.0
    low = (1 - high).nonzero().flatten().tolist()
    kv = torch.zeros(width, pool.kv_proj.in_features)
    rows = iter(low)
    for c in range(n_colours):  # +x and -x pairs keep the LayerNorm mean at 0
        kv[next(rows), PRESENCE + c] = PRESENCE_GAIN
        kv[next(rows), PRESENCE + c] = -PRESENCE_GAIN
    kv[next(rows), CONST] = 1 / CONST_VALUE
    kv[next(rows), CONST + 1] = 1 / CONST_VALUE
    for k in range(N_POS):
        kv[next(rows), GATED + k] = 1.0
        kv[next(rows), GATED + k] = -1.0
    pool.kv_proj.weight.copy_(kv)
    select = KEY_SHARPNESS * torch.diag(high)
    pool.attn.in_proj_weight.copy_(torch.cat([select, select, torch.eye(width)]))
    pool.attn.out_proj.weight.copy_(torch.eye(width))
    # Queries: the table's high-frequency part, and its negation in the low dims (which q drops),
    # so each row has mean 0 and ln_q only rescales it: q_i = c * table_i on the dims q/k keep.
    pool.query[:, high.bool()] = pool.pos_embed[:, high.bool()]
    pool.query[:, ~high.bool()] = -pool.pos_embed[:, high.bool()]
    pool.ln_q.weight.fill_(1.0)
    pool.ln_kv.weight.fill_(1.0)
