"""The layout of the Int4 release (Qwen/Qwen-VL-Chat-Int4), as data.

Only the LLM's block linears are quantised (`QUANTIZED`); the ViT, the resampler, `wte`, `lm_head`
and the norms stay 16-bit (float16, as the release). A quantised linear `L` with `in` inputs and
`out` outputs is stored in the AutoGPTQ ("gptq", v1) format that the release uses:

    L.qweight  int32   [in * bits / 32, out]     bits-wide codes, packed along the input dim
    L.qzeros   int32   [groups, out * bits / 32]  zero points minus one (the v1 convention)
    L.scales   float16 [groups, out]
    L.g_idx    int32   [in]                       group of each input (i // group_size without act-order)
    L.bias     float16 [out]                      zeros where the release has no bias

with groups = ceil(in / group_size) (group_size -1: one group). The weight is scales * (code - zero).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from workbench.model.shard_writer import TensorSpec

# The LLM block linears the release quantises, in the order GPTQ visits them: each inner tuple is
# one step of `true_sequential` (modules fed by the same input are quantised together).
SEQUENTIAL: tuple[tuple[str, ...], ...] = (("attn.c_attn",), ("attn.c_proj",), ("mlp.w1", "mlp.w2"), ("mlp.c_proj",))
QUANTIZED: tuple[str, ...] = tuple(name for step in SEQUENTIAL for name in step)
PACKED_BUFFERS = ("qweight", "qzeros", "scales", "g_idx", "bias")
RELEASE_FLOAT = torch.float16  # every unquantised weight of the release
BITS = (2, 4, 8)  # widths whose codes pack evenly into int32 words


@dataclass(frozen=True)
class GPTQSpec:
    """quantize_config.json of a GPTQ checkpoint; validates itself."""

    bits: int = 4
    group_size: int = 128
    damp_percent: float = 0.01
    desc_act: bool = False
    static_groups: bool = False
    sym: bool = True
    true_sequential: bool = True

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ValueError(f"bits: {self.bits} is not one of {', '.join(map(str, BITS))}")
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"group_size: {self.group_size} must be positive or -1 (one group per row)")
        if not 0 < self.damp_percent < 1:
            raise ValueError(f"damp_percent: {self.damp_percent} must lie in (0, 1)")

    @classmethod
    def from_config(cls, config: Any) -> GPTQSpec | None:
        """The spec in a model config's `quantization_config`, None for a 16-bit model."""
        qc = getattr(config, "quantization_config", None)
        if not qc:
            return None
        qc = qc if isinstance(qc, dict) else qc.to_dict()
        if qc.get("quant_method") != "gptq":
            raise ValueError(f"quantization_config.quant_method is {qc.get('quant_method')!r}; "
                             "only GPTQ checkpoints (quant_method: gptq) load")
        known = {k: qc[k] for k in cls.__dataclass_fields__ if k in qc}
        return cls(**known)

    def quantize_config(self) -> dict[str, Any]:
        """quantize_config.json as the release writes it (AutoGPTQ's keys)."""
        return {**asdict(self), "model_name_or_path": None, "model_file_base_name": "model"}

    def quantization_config(self) -> dict[str, Any]:
        """config.json's `quantization_config`: the same plus the method."""
        return {**self.quantize_config(), "quant_method": "gptq"}

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else math.ceil(in_features / self.group_size)

    def check_divides(self, name: str, in_features: int) -> None:
        """Refuse a group size that does not divide a layer's inputs (the kernels' requirement)."""
        if self.group_size != -1 and in_features % self.group_size:
            raise ValueError(f"group_size {self.group_size} does not divide {name}'s {in_features} inputs "
                             f"(use a divisor of {in_features}, or -1)")
        if in_features * self.bits % 32:
            raise ValueError(f"{name}: {in_features} inputs of {self.bits} bits do not fill int32 words")


def packed_specs(name: str, in_features: int, out_features: int, spec: GPTQSpec) -> list[TensorSpec]:
    """The five tensors of one quantised linear `name` (module path), in PACKED_BUFFERS order."""
    groups, words = spec.groups(in_features), 32 // spec.bits
    return [TensorSpec(f"{name}.qweight", torch.int32, (in_features // words, out_features)),
            TensorSpec(f"{name}.qzeros", torch.int32, (groups, out_features // words)),
            TensorSpec(f"{name}.scales", RELEASE_FLOAT, (groups, out_features)),
            TensorSpec(f"{name}.g_idx", torch.int32, (in_features,)),
            TensorSpec(f"{name}.bias", RELEASE_FLOAT, (out_features,))]


def quantized_linears(model: torch.nn.Module) -> list[str]:
    """Module paths of the linears the release quantises (transformer.h.<i>.<QUANTIZED>)."""
    return [f"transformer.h.{i}.{name}" for i in range(len(model.transformer.h)) for name in QUANTIZED]


def plan(model: torch.nn.Module, spec: GPTQSpec) -> list[TensorSpec]:
    """Every tensor of the Int4 checkpoint of `model` (a 16-bit QWenLMHeadModel, the meta device is
    enough): quantised linears as `packed_specs`, everything else in float16, model order."""
    quantized = {name: model.get_submodule(name) for name in quantized_linears(model)}
    specs: list[TensorSpec] = []
    for name, tensor in model.state_dict().items():
        module, _, leaf = name.rpartition(".")
        if module in quantized:
            if leaf == "weight":
                linear = quantized[module]
                spec.check_divides(module, linear.in_features)
                specs += packed_specs(module, linear.in_features, linear.out_features, spec)
            continue  # a bias is one of the packed tensors
        dtype = RELEASE_FLOAT if tensor.is_floating_point() else tensor.dtype
        specs.append(TensorSpec(name, dtype, tuple(tensor.shape)))
    return specs
