"""What a recipe does to a model, computed on the meta device (no weights, seconds for the 9.6B release).

The recipe is applied for real (PEFT on a meta-device model built from config.json), so the
counts are PEFT's, not a re-derivation. Quantisation is not run on the meta device; its bytes
come from `quantize.quantized_bytes` over the modules it would replace.

GPU memory estimate (activations only with a StepShape: they depend on batch and sequence length,
see activations.py):
  weights   = sum over frozen base tensors of numel * bytes(dtype)   [the run's dtype, bf16 by default]
              with the quantised linears at quantized_bytes instead   [4-bit column]
              or the tensors of the GPTQ Int4 checkpoint (gptq/layout.py) [Int4-base column: a GPTQ
              model, or the recipe on the Int4 export of this one]
  trainable = sum over trainable tensors of numel * 4 * bytes(param dtype)
              (the weight, its gradient, AdamW's exp_avg and exp_avg_sq, which torch keeps in the
              parameter's dtype: LoRA tensors are float32 -> 16 B, in-place trained bf16 -> 8 B)
  total     = weights + trainable
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from workbench.adapters.activations import StepShape, estimate_activations
from workbench.adapters.apply import apply_recipe
from workbench.adapters.quantize import quantized_bytes
from workbench.adapters.recipe import COMPONENTS, Quantization, Recipe
from workbench.adapters.sharded_memory import SHARDED_FORMULA, per_device_bytes, unit_bytes
from workbench.adapters.targets import PEFT_PREFIX, component_of, quantize_names, resolve_targets
from workbench.dtypes import TORCH_DTYPES
from workbench.gptq.layout import GPTQSpec, plan
from workbench.model.checkpoint import resolve_config_dir

MEMORY_FORMULA = ("weights: frozen numel x dtype bytes (4-bit: numel/2 + absmax per 64-block); "
                  "trainable: numel x 4 x param bytes (weight + grad + AdamW m, v); activations with --seq-len")


def format_layers(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    runs: list[list[int]] = []
    for i in layers:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def meta_model(model_dir: str | Path, dtype: str = "bfloat16") -> torch.nn.Module:
    """The full model on the meta device, from config.json alone."""
    from workbench.model.config import QWenConfig
    from workbench.model.modeling import QWenLMHeadModel

    with torch.device("meta"):
        return QWenLMHeadModel(QWenConfig.from_pretrained(str(model_dir))).to(TORCH_DTYPES[dtype])


def _int4_bytes(model: torch.nn.Module, spec: GPTQSpec) -> int | None:
    """Bytes of the model's GPTQ checkpoint; None when the group size does not divide its layers."""
    try:
        return sum(s.nbytes for s in plan(model, spec))
    except ValueError:
        return None


def inspect_recipe(model_dir: str | Path, recipe: Recipe, dtype: str = "bfloat16", devices: int | None = None,
                   step: StepShape | None = None) -> dict:
    """Per-component adapted modules, LoRA / fully trained / quantised counts and a memory estimate.

    With `devices`, also the per-device memory when FSDP / ZeRO-3 shard the run over that many
    devices (`sharded_memory`). With `step`, also the activations of one micro-batch of that shape
    (`activations`) and the step's total.
    """
    config_dir, note = resolve_config_dir(model_dir)
    model = meta_model(config_dir, dtype)
    targets = resolve_targets(model, recipe)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    # The 4-bit column uses the recipe's quantisation, or QLoRA's default (NF4 LLM linears) without one.
    q = recipe.quantization or Quantization()
    quantized = quantize_names(dict(model.named_modules()), q)
    # The GPTQ column: the model's own spec when it is an Int4 checkpoint, else the release's.
    own = GPTQSpec.from_config(model.config)
    is_gptq, gptq = own is not None, own or GPTQSpec()
    exports = {"16bit": sum(p.numel() * 2 for p in model.state_dict().values()), "int4": _int4_bytes(model, gptq)}
    with torch.device("meta"):
        peft_model = apply_recipe(model, dataclasses.replace(recipe, quantization=None))

    components = {}
    for name in COMPONENTS:
        spec, ct = recipe.components[name], targets.components[name]
        components[name] = {
            "modules": list(spec.modules), "layers": format_layers(ct.layers), "adapted_modules": len(ct.modules),
            "r": spec.r if ct.modules else None, "alpha": spec.alpha if ct.modules else None,
            "lora_params": 0, "trained_params": sum(shapes[p].numel() for p in ct.train),
            "quantized_modules": sum(component_of(m) == name and m != "lm_head" for m in targets.quantize),
            "lr_scale": spec.lr_scale if spec.trainable else None,
        }
    to_save = 0
    weights = weights_4bit = trainable_bytes = 0
    quantized_weights = {f"{PEFT_PREFIX}{m}.weight" for m in quantized}
    for pname, param in peft_model.named_parameters():
        nbytes = param.numel() * param.element_size()
        if ".lora_" in pname:
            components[component_of(pname)]["lora_params"] += param.numel()
        elif ".modules_to_save." in pname:
            to_save += param.numel()
        if param.requires_grad:
            trainable_bytes += 4 * nbytes
            continue
        weights += nbytes
        base = pname.replace(".base_layer.", ".")
        weights_4bit += quantized_bytes(param.numel(), param.shape[0], q) if base in quantized_weights else nbytes
    # On a GPTQ base the frozen weights are the Int4 checkpoint's tensors as they sit on the GPU, less
    # what the recipe trains in place (counted in trainable).
    trained_in_place = sum(p.numel() * 2 for n, p in peft_model.named_parameters()
                           if p.requires_grad and ".lora_" not in n and ".modules_to_save." not in n)
    weights_gptq = exports["int4"] - trained_in_place if exports["int4"] is not None else None
    memory = {"weights": weights, "weights_4bit": int(weights_4bit), "weights_gptq": weights_gptq,
              "trainable": trainable_bytes, "total": weights + trainable_bytes,
              "total_4bit": int(weights_4bit) + trainable_bytes,
              "total_gptq": weights_gptq + trainable_bytes if weights_gptq is not None else None}
    activation_terms = None
    if step is not None:
        activation_terms = estimate_activations(peft_model, step)
        memory["activations"] = activation_terms["activations"]
        resident = (memory["total_gptq"] if is_gptq else memory["total_4bit"] if recipe.quantization is not None
                    else memory["total"])
        memory["step_total"] = resident + activation_terms["activations"]
    sharded = None
    if devices is not None:
        sharded = per_device_bytes(unit_bytes(peft_model), weights + trainable_bytes, devices)
        sharded["formula"] = SHARDED_FORMULA
    lora = sum(c["lora_params"] for c in components.values())
    trained = sum(c["trained_params"] for c in components.values())
    return {
        "recipe": recipe.name, "description": recipe.description, "model": str(model_dir), "dtype": dtype,
        "config_note": note,
        "components": components,
        "modules_to_save": {"modules": targets.modules_to_save, "params": to_save},
        "quantization": dataclasses.asdict(q) | {"applied": recipe.quantization is not None,
                                                 "modules": len(quantized)},
        "totals": {"base_params": sum(s.numel() for s in shapes.values()), "lora_params": lora,
                   "trained_params": trained + to_save, "trainable_params": lora + trained + to_save,
                   "quantized_modules": len(targets.quantize)},
        "memory_bytes": memory,
        "gptq": dataclasses.asdict(gptq) | {"base_is_gptq": is_gptq},
        "export_bytes": exports,
        "memory_formula": MEMORY_FORMULA,
        **({"step": dataclasses.asdict(step), "activation_terms": activation_terms} if step else {}),
        **({"memory_per_device": sharded} if sharded else {}),
    }
