"""QLoRA: replace chosen nn.Linear modules in place by bitsandbytes 4-bit or 8-bit linears.

Run it on a loaded model (bf16/fp16/fp32 weights on their final device) before PEFT wraps it;
`apply.apply_recipe` does. Only the names that `targets.resolve_targets` lists are touched (by
default the LLM's c_attn, attn.c_proj, w1, w2, mlp.c_proj): the ViT, the resampler, `wte` and
`lm_head` keep their dtype unless the recipe names them.

We deliberately do not call `peft.prepare_model_for_kbit_training`: it casts every bf16/fp16
parameter to float32 (wte, lm_head and the ViT: ~4.4e9 parameters, +8.8 GB on the release) only
to keep frozen norms in fp32. PEFT already keeps the LoRA weights in float32
(`autocast_adapter_dtype`), freezing is done by `get_peft_model`, and gradient checkpointing
with input gradients is the trainer's switch.
"""

from __future__ import annotations

from torch import nn

from workbench.adapters.recipe import Quantization
from workbench.dtypes import TORCH_DTYPES

INT8_THRESHOLD = 6.0  # LLM.int8() outlier threshold (transformers' default)


def quantize_model(model: nn.Module, names: list[str], q: Quantization) -> None:
    """Swap each named nn.Linear for a quantised copy of itself; sets PEFT's k-bit flags."""
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, quantized_linear(getattr(parent, attr), q))
    # PEFT picks its bitsandbytes LoRA layers (and their merge code) only when these are set.
    model.is_loaded_in_4bit = q.bits == 4
    model.is_loaded_in_8bit = q.bits == 8


def quantized_linear(linear: nn.Linear, q: Quantization) -> nn.Module:
    import bitsandbytes as bnb

    device, has_bias = linear.weight.device, linear.bias is not None
    if q.bits == 4:
        new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                                compute_dtype=TORCH_DTYPES[q.compute_dtype], compress_statistics=q.double_quant,
                                quant_type=q.quant_type, device="meta")
        # Params4bit quantises on .to(device) (any non-meta device, the CPU included).
        new.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=q.double_quant,
                                       quant_type=q.quant_type, module=new).to(device)
        # bitsandbytes >= 0.48 on a CPU with AVX512-BF16: an eval-mode forward on an input without
        # grad repacks the weight in place for a CPU kernel that has no backward, so later training
        # forwards silently lose the LoRA gradients. Keep the autograd-capable layout.
        new.support_avx512bf16_for_cpu = False
    else:
        new = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                  has_fp16_weights=False, threshold=INT8_THRESHOLD, device="meta")
        # Int8Params quantises only when moved from the CPU to a non-meta device.
        new.weight = bnb.nn.Int8Params(linear.weight.data.cpu(), requires_grad=False,
                                       has_fp16_weights=False).to(device)
    if has_bias:
        new.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    new.train(linear.training)
    return new


def quantized_bytes(numel: int, out_features: int, q: Quantization) -> float:
    """Bytes a quantised weight takes on the GPU (used by inspect).

    4-bit: numel/2 packed bytes, plus one absmax per 64-value block: float32 (4 B), or with double
    quantisation 1 B plus a float32 per 256 blocks. 8-bit: numel bytes plus a float32 scale per row.
    """
    if q.bits == 8:
        return numel + 4 * out_features
    blocks = numel / 64
    absmax = blocks * (1 + 4 / 256) if q.double_quant else blocks * 4
    return numel / 2 + absmax
