"""Put a recipe on a model: quantise, inject one PEFT LoRA adapter, unfreeze fully trained parameters.

The result is a plain `peft.PeftModel`; `PeftModel.from_pretrained(base, dir)` reloads what
`save_adapter` writes. How the recipe maps onto one `LoraConfig`:

* `target_modules`: the explicit full module names (no suffix guessing when reloading).
* per-component r and alpha: `rank_pattern` / `alpha_pattern`, one regex per adapted component
  (`targets.PATTERNS`), read back by PEFT's `get_pattern_key`.
* per-component `use_rslora`: folded into alpha_pattern (alpha' = alpha * sqrt(r), so alpha'/r =
  alpha/sqrt(r)) and `use_rslora` stays False, so mixed settings load and merge exactly.
* per-component `dropout`: PEFT has one `lora_dropout`; it holds the primary component's (the LLM's
  if adapted) and `apply_recipe` then sets each LoRA layer's dropout to its component's. Dropout
  only matters in training, so a reloaded adapter infers identically. PEFT's LoRA on
  nn.MultiheadAttention (the resampler's `attn`) merges B@A into the weights for each forward and
  applies no dropout at all.
* `use_dora`: one flag per PEFT adapter, so adapted components must agree (checked in targets).
* `modules_to_save` (top level): PEFT's own, saved as plain `base_model.model.<module>.weight`.
* no LoRA at all (a recipe that only trains parameters fully, like the paper's stage 1): PEFT's
  placeholder `target_modules` ("dummy-target-modules") makes a PeftModel without LoRA layers, so
  training, saving, reloading and merging take the same path as any other adapter.
* `train` (per component): trained in place (requires_grad=True, no copy). PEFT does not save
  such parameters (e.g. `attn_pool.query` is a bare nn.Parameter, which modules_to_save cannot
  wrap), so `save_adapter` adds them to adapter_model.safetensors under their PEFT state-dict
  names, `base_model.model.<release name>`. PEFT's loader passes keys it does not own through to
  `load_state_dict(strict=False)`, so `PeftModel.from_pretrained` restores them; a merge reads any
  non-LoRA key as a replacement of the base tensor with the same name.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.constants import DUMMY_TARGET_MODULES
from torch import nn

from workbench.adapters.quantize import quantize_model
from workbench.adapters.recipe import COMPONENTS, Recipe
from workbench.adapters.targets import PATTERNS, Targets, component_of, resolve_targets
from workbench.atomic import follow_umask
from workbench.gptq import quiet_library

ADAPTER = "default"
WEIGHTS_FILE = "adapter_model.safetensors"


def apply_recipe(model: nn.Module, recipe: Recipe) -> PeftModel:
    """Quantise (if the recipe says so), add LoRA, and set requires_grad exactly as the recipe says."""
    targets = resolve_targets(model, recipe)
    quiet_library()  # PEFT imports gptqmodel when it creates LoRA layers
    if recipe.quantization is not None:
        quantize_model(model, targets.quantize, recipe.quantization)
    with warnings.catch_warnings():
        # PEFT 0.21 reads `is_gradient_checkpointing`, which transformers 5.2x deprecates: not the user's to fix.
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        peft_model = get_peft_model(model, lora_config(recipe, targets))
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_dropout") and ADAPTER in module.lora_dropout:
            p = recipe.components[component_of(name)].dropout
            module.lora_dropout[ADAPTER] = nn.Dropout(p) if p > 0 else nn.Identity()
    for comp in targets.components.values():
        for name in comp.train:
            peft_model.base_model.model.get_parameter(name).requires_grad_(True)
    return peft_model


def lora_config(recipe: Recipe, targets: Targets) -> LoraConfig:
    adapted = [c for c in COMPONENTS if targets.components[c].modules]
    # Without LoRA, the (unused) r and alpha PEFT requires are the llm's.
    primary = recipe.components["llm" if "llm" in adapted or not adapted else adapted[0]]

    def alpha(c: str) -> float:
        comp = recipe.components[c]
        return comp.alpha * math.sqrt(comp.r) if comp.use_rslora else comp.alpha

    return LoraConfig(
        r=primary.r, lora_alpha=alpha(primary.name), lora_dropout=primary.dropout,
        target_modules=targets.lora_modules or DUMMY_TARGET_MODULES,
        rank_pattern={PATTERNS[c]: recipe.components[c].r for c in adapted},
        alpha_pattern={PATTERNS[c]: alpha(c) for c in adapted},
        use_rslora=False, use_dora=primary.use_dora, bias="none", task_type="CAUSAL_LM",
        modules_to_save=targets.modules_to_save or None,
    )


def param_groups(model: nn.Module, recipe: Recipe, base_lr: float, weight_decay: float) -> list[dict]:
    """Optimizer groups per component (lr = base_lr * lr_scale); no weight decay on 1-D tensors.

    1-D tensors are the norms, biases and DoRA magnitudes. modules_to_save (`wte`, `lm_head`)
    and `ln_f` take the LLM's lr_scale. Each group carries a `name` for logging.
    """
    groups: dict[tuple[str, bool], list] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault((component_of(name), param.ndim >= 2), []).append(param)
    return [
        {"name": comp if decay else f"{comp}.no_decay", "params": params,
         "lr": base_lr * recipe.components[comp].lr_scale, "weight_decay": weight_decay if decay else 0.0}
        for (comp, decay), params in sorted(groups.items())
    ]


def trained_state_dict(model: PeftModel, state_dict: dict | None = None) -> dict:
    """The fully trained parameters (`train`) that PEFT's own state dict leaves out.

    With `state_dict` (the full model state gathered by FSDP or DeepSpeed, whose parameters on
    this rank are only shards), the values come from it, under the same names.
    """
    names = [name for name, param in model.named_parameters()
             if param.requires_grad and ".lora_" not in name and ".modules_to_save." not in name]
    if state_dict is None:
        return {name: model.get_parameter(name).detach() for name in names}
    return {name: state_dict[name] for name in names if name in state_dict}


def save_adapter(model: PeftModel, out_dir: str | Path, state_dict: dict | None = None) -> None:
    """`model.save_pretrained(out_dir)` plus the fully trained parameters in the same weights file."""
    from safetensors.torch import load_file, save_file

    model.save_pretrained(out_dir, state_dict=state_dict)
    extra = trained_state_dict(model, state_dict)
    if extra:
        path = Path(out_dir) / WEIGHTS_FILE
        tensors = load_file(path)
        tensors.update({k: v.contiguous().cpu() for k, v in extra.items()})
        save_file(tensors, path, metadata={"format": "pt"})
    for file in Path(out_dir).glob("adapter_model.*"):
        follow_umask(file)
    _check_not_empty(Path(out_dir) / WEIGHTS_FILE)


def _check_not_empty(path: Path) -> None:
    """A written adapter always holds tensors (every recipe trains some). An empty one means the
    state dict handed to the save lacked the adapter's names: seen under FSDP when a library's lazy
    import failed and was swallowed (httpx missing). Stop there rather than ship an empty adapter."""
    from safetensors import safe_open

    if not path.is_file():  # a rank that does not write
        return
    with safe_open(path, framework="pt") as f:
        if not list(f.keys()):
            raise RuntimeError(f"{path}: the adapter was saved without any tensor; the state dict given to the save "
                               "did not hold the adapter's weights")
