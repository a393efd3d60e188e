"""Resolve a recipe against a model: which modules get LoRA, which parameters train fully, what is quantised.

Components own these names (release names, see ARCHITECTURE.md):

* `llm`: `transformer.h.<i>.*` (blocks), `transformer.ln_f`; also `wte` and `lm_head` for lr groups.
* `vit`: `transformer.visual.*` outside the resampler (`transformer.resblocks.<i>.*` are the blocks).
* `resampler`: `transformer.visual.attn_pool.*` plus `ln_post` and `proj`, which map its output into
  the LLM's space (the original's full fine-tune keeps them frozen with the ViT; here a recipe may
  train them with the resampler).

Matching rules. A LoRA module pattern matches a candidate (an `nn.Linear`, or the resampler's
`nn.MultiheadAttention`) when the candidate's name inside its block (inside `attn_pool` for the
resampler) equals the pattern or ends with `.pattern`, as PEFT's suffix matching does: `c_proj` in
the LLM is both `attn.c_proj` and `mlp.c_proj`. A `train` pattern matches a parameter of the
component when `.pattern.` occurs in `.name.`: a parameter (`query`), a module owning parameters
(`ln_q`, `ln_1`) or a path (`mlp.c_fc.bias`); `all` matches every parameter of the component
except the resampler's fixed sin-cos table (`FIXED`). Both respect `layers` inside blocks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from workbench.adapters.recipe import COMPONENTS, LAYERED, Quantization, Recipe
from workbench.errors import ConfigError, nearest
from workbench.gptq.modules import is_gptq_linear

BLOCKS = {"llm": "transformer.h.", "vit": "transformer.visual.transformer.resblocks."}
RESAMPLER = "transformer.visual.attn_pool."
RESAMPLER_EXTRA = ("transformer.visual.ln_post.", "transformer.visual.proj")
# PEFT's rank_pattern/alpha_pattern keys: regexes matched with get_pattern_key on module names.
PATTERNS = {
    "llm": r"transformer\.h\.\d+\..+",
    "vit": r"transformer\.visual\.transformer\.resblocks\.\d+\..+",
    "resampler": r"transformer\.visual\.attn_pool\..+",
}
PEFT_PREFIX = "base_model.model."
TRAIN_ALL = "all"  # a `train` pattern: the whole component (full training, e.g. the paper's stages)
# Never trained by `all`: the release keeps this table fixed (requires_grad False, docs/qwen-vl.md §4.1).
FIXED = ("transformer.visual.attn_pool.pos_embed",)


@dataclass
class ComponentTargets:
    modules: list[str] = field(default_factory=list)  # full names of LoRA targets
    layers: list[int] = field(default_factory=list)  # selected blocks (llm/vit)
    train: list[str] = field(default_factory=list)  # full names of fully trained parameters


@dataclass
class Targets:
    components: dict[str, ComponentTargets]
    modules_to_save: list[str]  # full module names (PEFT copies and trains them)
    quantize: list[str]  # full names of the linears to quantise

    @property
    def lora_modules(self) -> list[str]:
        return sorted(m for c in self.components.values() for m in c.modules)


def component_of(name: str) -> str:
    """The component a parameter or module name belongs to (PEFT's wrapper prefix allowed)."""
    name = name.removeprefix(PEFT_PREFIX)
    if name.startswith(RESAMPLER) or name.startswith(RESAMPLER_EXTRA):
        return "resampler"
    if name.startswith("transformer.visual."):
        return "vit"
    return "llm"


def parse_layers(spec: object, n_layers: int, where: str) -> list[int]:
    """`all`, an int, "a-b" (inclusive), "first N", "last N", or a list of ints and ranges."""
    items = spec if isinstance(spec, list) else [spec]
    chosen: set[int] = set()
    for item in items:
        chosen.update(_layer_item(item, n_layers, where))
    if not chosen:
        raise ConfigError(f"{where}: selects no layer")
    bad = sorted(i for i in chosen if not 0 <= i < n_layers)
    if bad:
        raise ConfigError(f"{where}: layer {bad[0]} is out of range; this model has {n_layers} "
                          f"layers, 0-{n_layers - 1}")
    return sorted(chosen)


def _layer_item(item: object, n: int, where: str) -> range | list[int]:
    if isinstance(item, int) and not isinstance(item, bool):
        return [item]
    text = str(item).strip().lower()
    if text == "all":
        return range(n)
    match = re.fullmatch(r"(first|last)\s+(\d+)", text)
    if match:
        k = int(match[2])
        if not 0 < k <= n:
            raise ConfigError(f"{where}: '{item}' asks for {k} layers; this model has {n}")
        return range(k) if match[1] == "first" else range(n - k, n)
    match = re.fullmatch(r"(\d+)\s*-\s*(\d+)", text)
    if match and int(match[1]) <= int(match[2]):
        return range(int(match[1]), int(match[2]) + 1)
    raise ConfigError(f"{where}: cannot read {item!r}; use all, 5, \"40-47\", \"last 8\", \"first 4\" "
                      "or a list of these")


def resolve_targets(model: nn.Module, recipe: Recipe) -> Targets:
    """Check the recipe against `model` (before PEFT wraps it) and list every affected name."""
    modules = dict(model.named_modules())
    params = [n for n, _ in model.named_parameters()]
    resolved = {name: _resolve_component(recipe, name, modules, params) for name in COMPONENTS}
    adapted = [c for c in COMPONENTS if resolved[c].modules]
    if not adapted and not any(c.train for c in resolved.values()) and not recipe.modules_to_save:
        raise ConfigError(f"{recipe.file}: nothing trains; give a component LoRA modules (e.g. llm.modules: "
                          "[c_attn]) or parameters to train fully (e.g. vit.train: [all])")
    _check_dora(recipe, adapted, modules, resolved)
    to_save = _match_whole_model(recipe, "modules_to_save", recipe.modules_to_save, modules)
    lora = {m for c in resolved.values() for m in c.modules}
    for name in to_save:
        inside = [m for m in lora if m == name or m.startswith(name + ".") or name.startswith(m + ".")]
        if inside:
            raise ConfigError(f"{recipe.where('modules_to_save')}: '{name}' overlaps LoRA target '{inside[0]}'")
    targets = Targets(resolved, to_save, quantize_names(modules, recipe.quantization) if recipe.quantization else [])
    _check_quantized_not_trained(recipe, targets)
    return targets


def _candidates(modules: dict[str, nn.Module], comp: str) -> dict[str, str]:
    """LoRA-able modules of a component: full name -> name inside its block (or attn_pool)."""
    mha = [n for n, m in modules.items() if isinstance(m, nn.MultiheadAttention)]
    out = {}
    for name, module in modules.items():
        lora_able = isinstance(module, nn.Linear | nn.MultiheadAttention) or is_gptq_linear(module)
        if not lora_able or component_of(name) != comp:
            continue
        if any(name.startswith(m + ".") for m in mha):
            continue  # the MHA's out_proj: PEFT adapts it through the MHA (its forward is never called)
        rel = _relative(name, comp)
        if rel is not None:
            out[name] = rel
    return out


def _relative(name: str, comp: str) -> str | None:
    if comp == "resampler":
        return name.removeprefix(RESAMPLER) if name.startswith(RESAMPLER) else None
    match = re.match(re.escape(BLOCKS[comp]) + r"\d+\.(.+)", name)
    return match[1] if match else None


def _layer_of(name: str, comp: str) -> int | None:
    if comp not in LAYERED:
        return None
    match = re.match(re.escape(BLOCKS[comp]) + r"(\d+)\.", name)
    return int(match[1]) if match else None


def _count_layers(modules: dict[str, nn.Module], comp: str) -> int:
    return len({_layer_of(n, comp) for n in modules} - {None})


def _resolve_component(recipe: Recipe, comp: str, modules: dict[str, nn.Module], params: list[str]
                       ) -> ComponentTargets:
    spec = recipe.components[comp]
    out = ComponentTargets()
    if not spec.trainable:
        return out
    if comp in LAYERED:
        out.layers = parse_layers(spec.layers, _count_layers(modules, comp), recipe.where(f"{comp}.layers"))

    def selected(name: str) -> bool:
        layer = _layer_of(name, comp)
        return layer is None or layer in out.layers

    candidates = _candidates(modules, comp)
    for pattern in spec.modules:
        hits = [n for n, rel in candidates.items() if rel == pattern or rel.endswith("." + pattern)]
        if not hits:
            suffixes = {rel.split(".", i)[-1] for rel in candidates.values() for i in range(rel.count(".") + 1)}
            raise ConfigError(f"{recipe.where(f'{comp}.modules')}: '{pattern}' matches no module of the "
                              f"{comp}; {nearest(pattern, sorted(suffixes))}")
        out.modules += [n for n in hits if selected(n) and n not in out.modules]

    own = [p for p in params if component_of(p) == comp]
    for pattern in spec.train:
        hits = [p for p in own if p not in FIXED] if pattern == TRAIN_ALL else \
            [p for p in own if f".{pattern}." in f".{p}."]
        if not hits:
            names = sorted({_relative(p, comp) or p.removeprefix("transformer.") for p in own})
            raise ConfigError(f"{recipe.where(f'{comp}.train')}: '{pattern}' matches no parameter of the "
                              f"{comp}; {nearest(pattern, names)}")
        out.train += [p for p in hits if selected(p) and p not in out.train]
    for p in out.train:
        owner = next((m for m in out.modules if p.startswith(m + ".")), None)
        if owner:
            raise ConfigError(f"{recipe.where(f'{comp}.train')}: '{p}' belongs to '{owner}', which "
                              f"{comp}.modules already adapts with LoRA; train one or the other")
    out.modules.sort()
    return out


def _check_dora(recipe: Recipe, adapted: list[str], modules: dict[str, nn.Module],
                resolved: dict[str, ComponentTargets]) -> None:
    # PEFT keeps one use_dora flag per adapter, so the components must agree.
    flags = {c: recipe.components[c].use_dora for c in adapted}
    if len(set(flags.values())) > 1:
        odd = next(c for c in adapted if flags[c] != flags[adapted[0]])
        raise ConfigError(f"{recipe.where(f'{odd}.use_dora')}: is {flags[odd]} but {adapted[0]}.use_dora is "
                          f"{flags[adapted[0]]}; one PEFT adapter has one DoRA setting for all components")
    if flags.get("resampler"):
        mha = [m for m in resolved["resampler"].modules if isinstance(modules[m], nn.MultiheadAttention)]
        if mha:
            raise ConfigError(f"{recipe.where('resampler.use_dora')}: PEFT has no DoRA for "
                              f"nn.MultiheadAttention ('{mha[0]}'); drop 'attn' from resampler.modules "
                              "or set use_dora: false")


def _match_whole_model(recipe: Recipe, key: str, patterns: tuple[str, ...], modules: dict[str, nn.Module]
                       ) -> list[str]:
    out = []
    for pattern in patterns:
        hits = [n for n in modules if n == pattern or n.endswith("." + pattern)]
        if not hits:
            top = sorted({n.rsplit(".", 1)[-1] for n in modules if n})
            raise ConfigError(f"{recipe.where(key)}: '{pattern}' matches no module; {nearest(pattern, top)}")
        out += [n for n in hits if n not in out]
    return out


def quantize_names(modules: dict[str, nn.Module], q: Quantization) -> list[str]:
    """Linears of the components named in quantization.components; never the MHA's out_proj."""
    out = []
    for comp in q.components:
        if comp == "lm_head":
            out += [n for n in modules if n == "lm_head"]
            continue
        out += [n for n in _candidates(modules, comp) if isinstance(modules[n], nn.Linear)]
    return sorted(out)


def _check_quantized_not_trained(recipe: Recipe, targets: Targets) -> None:
    quantized = set(targets.quantize)
    for comp, ct in targets.components.items():
        for p in ct.train:
            if p.endswith(".weight") and p.removesuffix(".weight") in quantized:
                raise ConfigError(f"{recipe.where(f'{comp}.train')}: '{p}' is quantised by quantization."
                                  "components and cannot train fully; train its LoRA instead")
    for name in targets.modules_to_save:
        if name in quantized:
            raise ConfigError(f"{recipe.where('modules_to_save')}: '{name}' is quantised by "
                              "quantization.components and cannot be trained as a module to save")
