"""FLOPs of one optimizer step of the benchmark workload, counted the same way for every variant.

The count is the work of the original recipe, so achieved TFLOP/s compare across optimisations:
per micro-batch, the LLM's matmuls run forward, backward (input gradients; LoRA's own weight
gradients are negligible) and once more for the recomputation that full activation checkpointing
does; causal attention counts half of the T x T scores; the frozen ViT and resampler run forward
only. For the release at 2048 tokens this is 0.74 PFLOP per step of 8 micro-batches, in line with
the "about 0.8 PFLOP" the original's measurement quotes.
"""

from __future__ import annotations

from workbench.model.config import QWenConfig


def llm_forward_flops(config: QWenConfig, tokens: int) -> tuple[float, float]:
    """(transformer blocks, lm_head) forward matmul FLOPs for one sequence of `tokens`."""
    h, f = config.hidden_size, config.intermediate_size // 2
    per_block = 2 * tokens * (4 * h * h + 3 * h * f)  # c_attn (3h x h), attn.c_proj, w1, w2, mlp.c_proj
    attention = 2 * tokens * tokens * h  # QK^T and AV, causal half of 4*T^2*h
    head = 2 * tokens * h * config.vocab_size
    return config.num_hidden_layers * (per_block + attention), head


def vision_forward_flops(config: QWenConfig) -> float:
    """ViT + resampler forward for one image at the config's resolution."""
    v = config.visual
    w, out = v["width"], v["output_dim"]
    patches = (v["image_size"] // v["patch_size"]) ** 2
    mlp = int(w * v["mlp_ratio"])
    per_block = 2 * patches * (4 * w * w + 2 * w * mlp) + 4 * patches * patches * w
    stem = 2 * patches * 3 * v["patch_size"] ** 2 * w
    queries = 256
    resampler = 2 * patches * w * out + 2 * queries * 2 * out * out + 2 * patches * 2 * out * out \
        + 4 * queries * patches * out + 2 * queries * out * out
    return stem + v["layers"] * per_block + resampler


def step_flops(config: QWenConfig, seq_len: int, images_per_sample: int, grad_accum: int) -> float:
    """FLOPs of one optimizer step (grad_accum micro-batches of one sample each)."""
    blocks, head = llm_forward_flops(config, seq_len)
    llm = 3 * blocks + 2 * head  # forward + input-gradient backward + recomputation (not lm_head)
    vision = images_per_sample * vision_forward_flops(config)
    return grad_accum * (llm + vision)


# Dense bf16 tensor-core peaks from NVIDIA's datasheets (TFLOP/s, without sparsity), for MFU:
# achieved FLOP/s over what the card can do at most. Matched on torch.cuda.get_device_name(), the
# more specific names first (an "H100 NVL" also contains "H100").
DATASHEET_BF16_TFLOPS = (
    ("H200 NVL", 835.0),
    ("H200", 989.4),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),  # SXM: "NVIDIA H100 80GB HBM3"
    ("A100", 312.0),
)


def datasheet_peak(device_name: str) -> float | None:
    """FLOP/s of the card's dense bf16 datasheet peak, or None for a card not in the table (or the CPU)."""
    for key, tflops in DATASHEET_BF16_TFLOPS:
        if key in device_name:
            return tflops * 1e12
    return None
