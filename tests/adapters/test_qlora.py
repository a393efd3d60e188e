"""QLoRA on the CPU with the tiny reference model: what is quantised, training steps, the repack hazard."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import has_avx512bf16
from safetensors.torch import load_file

from workbench.adapters.apply import apply_recipe
from workbench.adapters.quantize import quantized_bytes, quantized_linear
from workbench.adapters.recipe import Quantization, load_recipe

LLM_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")


@pytest.fixture(scope="module")
def batch(tiny_ref_dir):
    cases = load_file(str(tiny_ref_dir / "cases.safetensors"))
    ids = cases["case2.input_ids"]
    return {"input_ids": ids, "labels": ids, "pixel_values": cases["pixel_values.a"]}


def quantized_names(model) -> set[str]:
    return {n.removeprefix("base_model.model.").removesuffix(".base_layer") for n, m in model.named_modules()
            if isinstance(m, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt)}


def lora_grads_ok(model) -> bool:
    return all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if ".lora_" in n)


def test_qlora_quantises_exactly_the_llm_linears(tiny):
    model = apply_recipe(tiny, load_recipe("qlora"))
    assert quantized_names(model) == {f"transformer.h.{i}.{m}" for i in range(2) for m in LLM_LINEARS}
    base = model.get_base_model()
    weight = base.transformer.h[0].mlp.c_proj.weight
    assert (weight.quant_type, weight.compress_statistics, weight.dtype) == ("nf4", True, torch.uint8)
    assert base.transformer.h[0].mlp.c_proj.compute_dtype == torch.bfloat16
    # the vision tower, the resampler, wte and lm_head keep their float32 weights
    for name in ("transformer.visual.attn_pool.kv_proj", "transformer.visual.transformer.resblocks.0.mlp.c_fc",
                 "lm_head", "transformer.wte"):
        assert base.get_submodule(name).weight.dtype == torch.float32, name
    assert all(not m.support_avx512bf16_for_cpu for m in base.modules() if isinstance(m, bnb.nn.Linear4bit))


@pytest.mark.parametrize("quantization", [{}, {"quant_type": "fp4", "double_quant": False,
                                               "compute_dtype": "float32"}, {"bits": 8}])
def test_forward_backward_and_optimizer_step(tiny, batch, quantization):
    model = apply_recipe(tiny, load_recipe("qlora", {"quantization": quantization})).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(2):  # B starts at 0, so A has a gradient only from the second step on
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert lora_grads_ok(model)
    assert losses[1] < losses[0]


def test_eval_then_train_still_gives_lora_gradients(tiny, batch):
    model = apply_recipe(tiny, load_recipe("qlora"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_()
    model.eval()
    with torch.no_grad():
        model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"])
    packed = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)
              and getattr(m.weight.quant_state, "packing_format_for_cpu", False)]
    assert packed == []
    model.train()
    model(**batch).loss.backward()
    assert lora_grads_ok(model)


@pytest.mark.skipif(not has_avx512bf16(), reason="the repack only happens on CPUs with AVX512-BF16")
def test_the_repack_hazard_is_real_without_the_switch():
    layer = quantized_linear(torch.nn.Linear(64, 64, bias=False), Quantization(compute_dtype="float32"))
    layer.support_avx512bf16_for_cpu = True  # bitsandbytes' default on this CPU
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, 64))
    assert layer.weight.quant_state.packing_format_for_cpu  # repacked in place: no autograd path left


def test_quantized_linear_is_close_to_the_original():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128)
    x = torch.randn(4, 256)
    for q in (Quantization(compute_dtype="float32"), Quantization(bits=8)):
        out = quantized_linear(linear, q)(x)
        rel = (out - linear(x)).norm() / linear(x).norm()
        assert rel < (0.15 if q.bits == 4 else 0.02), (q, rel)


def test_quantized_bytes_formula():
    # 4096x4096 NF4: 8388608 packed bytes; 262144 blocks of 64 -> absmax 1 B each + a float32 per 256 blocks
    assert quantized_bytes(4096 * 4096, 4096, Quantization()) == 8_388_608 + 262_144 + 4 * 1024
    assert quantized_bytes(4096 * 4096, 4096, Quantization(double_quant=False)) == 8_388_608 + 4 * 262_144
    assert quantized_bytes(4096 * 4096, 4096, Quantization(bits=8)) == 16_777_216 + 4 * 4096
