"""Qwen-VL-Chat with its LLM linears on GPTQModel's quantised linears, ready for PEFT's LoRA.

`load_model` (model/checkpoint.py) calls `swap_in` on the meta-device model of a GPTQ checkpoint,
assigns the file's tensors like any others, then `finish`: files hold the v1 zero points, the
kernels that want v2 get them converted, and each kernel's `post_init` runs. On the CPU that is
GPTQModel's torch kernel (dequantise, then matmul; autograd flows to the input, so LoRA trains on
it); on CUDA, whichever kernel GPTQModel picks for the device (Marlin, ExLlama, Triton).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from workbench.gptq import quiet_library
from workbench.gptq.layout import GPTQSpec, quantized_linears


@functools.lru_cache
def kernel_class(spec: GPTQSpec, device: torch.device | str, dtype: torch.dtype | None = None) -> type[nn.Module]:
    """GPTQModel's quantised linear for this spec on `device`: its torch kernel on the CPU, else the
    library's choice among its kernels that also train (LoRA needs the input's gradient) for the
    activations' dtype (the kernels take float16 or bfloat16; float32 activations are cast)."""
    quiet_library()
    from gptqmodel.utils.importer import hf_select_quant_linear_v2

    device = torch.device(device)
    return hf_select_quant_linear_v2(
        bits=spec.bits, group_size=spec.group_size, desc_act=spec.desc_act, sym=spec.sym, format="gptq",
        quant_method="gptq", pack=False, device_map={"": str(device)},
        dtype=dtype if dtype in (torch.float16, torch.bfloat16) else None,
        backend="torch" if device.type == "cpu" else "auto_trainable")


def new_linear(cls: type[nn.Module], spec: GPTQSpec, in_features: int, out_features: int) -> nn.Module:
    # bias=True always: the release stores a (zero) bias for every quantised linear.
    return cls(bits=spec.bits, group_size=spec.group_size, sym=spec.sym, desc_act=spec.desc_act,
               in_features=in_features, out_features=out_features, bias=True, pack_dtype=torch.int32,
               register_buffers=True)


def swap_in(model: nn.Module, spec: GPTQSpec, device: torch.device | str, dtype: torch.dtype | None = None) -> None:
    """Replace the LLM's block linears of a (meta-device) model by empty quantised linears."""
    cls = kernel_class(spec, device, dtype)
    for name in quantized_linears(model):
        parent, _, attr = name.rpartition(".")
        linear = model.get_submodule(name)
        spec.check_divides(name, linear.in_features)
        with torch.device("meta"):
            setattr(model.get_submodule(parent), attr, new_linear(cls, spec, linear.in_features, linear.out_features))
    model.config.quantization_config = spec.quantization_config()


def finish(model: nn.Module) -> None:
    """After the tensors are assigned: v1 -> v2 zero points where the kernel wants them, post_init."""
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module

    for module in model.modules():
        if isinstance(module, BaseQuantLinear):
            if getattr(module, "REQUIRES_FORMAT_V2", False):
                convert_gptq_v1_to_v2_format_module(module, bits=module.bits, pack_dtype=module.pack_dtype)
                module.qzero_format(format=2)
            if module.qweight.device.type == "cpu":
                # post_init would torch.compile the dequantisation of every linear separately: minutes of
                # compiling on the CPU for a step that takes milliseconds.
                module.optimized = True
            module.post_init()


def is_gptq_linear(module: nn.Module) -> bool:
    """One of GPTQModel's quantised linears (told by its class's home, so gptqmodel is not imported)."""
    return type(module).__module__.startswith("gptqmodel.")
