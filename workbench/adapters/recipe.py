"""Adapter recipes: YAML data that says what to adapt, train and quantise in each component.

A recipe (`adapters/<name>.yaml`) has one section per component, `vit`, `resampler` and `llm`:

    llm:
      modules: [c_attn, attn.c_proj, w1, w2]   # the model's own module names, suffix-matched in a block
      layers: all                              # llm/vit only: all | 5 | "40-47" | "last 8" | "first 4" | a list
      r: 64
      alpha: 16
      dropout: 0.05
      use_rslora: false                        # scale alpha/sqrt(r) instead of alpha/r
      use_dora: false
      train: [ln_1, ln_2]                      # parameters trained fully (names, owning modules, or all)
      lr_scale: 1.0                            # this component's lr = the run's train.lr * lr_scale
      frozen: false                            # true: nothing in the component trains (the default)

and top-level `description`, `modules_to_save` (whole modules PEFT copies and trains, e.g. `wte`,
`lm_head`) and `quantization` (bits 4|8; for 4 bits quant_type nf4|fp4, double_quant and
compute_dtype, which 8 bits ignores; components: whose linears to quantise, default [llm]).
A component that is absent is frozen. `train: [all]` trains a whole component fully, and a recipe
may have no LoRA at all (the paper's stage 1: `vit` and `resampler` with `train: [all]`).
The per-component learning rate is a *scale* of the run's base lr (not an absolute lr), so a
schedule or a `--set train.lr=...` keeps the ratios the recipe chose.

`load_recipe(name_or_path)` finds a bare name in the repository's `adapters/` folder
(`Path(workbench.__file__).parents[1] / "adapters"`, i.e. next to the `workbench/` package in a
source or editable install); anything with a slash or a .yaml suffix is a path. This module
checks everything that needs no model; `targets.resolve_targets` checks the rest (module
patterns that match nothing, layers out of range) and reports with `Recipe.where`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import workbench
from workbench.errors import ConfigError, nearest

RECIPE_DIR = Path(workbench.__file__).resolve().parents[1] / "adapters"
COMPONENTS = ("vit", "resampler", "llm")
LAYERED = ("vit", "llm")  # components built from numbered blocks
TOP_KEYS = ("description", *COMPONENTS, "modules_to_save", "quantization")
COMPONENT_KEYS = ("modules", "layers", "r", "alpha", "dropout", "use_rslora", "use_dora", "train",
                  "lr_scale", "frozen")
QUANT_KEYS = ("bits", "quant_type", "double_quant", "compute_dtype", "components")
QUANT_COMPONENTS = (*COMPONENTS, "lm_head")
DTYPES = ("bfloat16", "float16", "float32")
# PEFT's and finetune.py's spellings, which people will type.
ALIASES = {"lr": "lr_scale", "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
           "target_modules": "modules"}


@dataclass(frozen=True)
class Component:
    name: str
    modules: tuple[str, ...] = ()
    layers: Any = "all"  # the raw spec; targets.parse_layers resolves it against the model
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    train: tuple[str, ...] = ()
    lr_scale: float = 1.0
    frozen: bool = False

    @property
    def adapted(self) -> bool:
        return bool(self.modules)

    @property
    def trainable(self) -> bool:
        return bool(self.modules or self.train)


@dataclass(frozen=True)
class Quantization:
    bits: int = 4
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    components: tuple[str, ...] = ("llm",)


@dataclass(frozen=True)
class Recipe:
    name: str
    file: str  # the recipe YAML, for error messages
    description: str = ""
    components: dict[str, Component] = field(default_factory=dict)  # all of COMPONENTS
    modules_to_save: tuple[str, ...] = ()
    quantization: Quantization | None = None
    override_source: str = ""  # the run config whose adapter_overrides were merged in
    overridden: frozenset[str] = frozenset()  # dotted keys of the values adapter_overrides set

    def where(self, key: str) -> str:
        """'file: dotted.key' of whoever set `key`: the run config's overrides or the recipe."""
        parts = key.split(".")
        if any(".".join(parts[:i]) in self.overridden for i in range(1, len(parts) + 1)):
            return f"{self.override_source}: adapter_overrides.{key}"
        return f"{self.file}: {key}"

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain YAML data (written into the run record)."""
        out: dict[str, Any] = {"description": self.description}
        for name, comp in self.components.items():
            values = {k: getattr(comp, k) for k in COMPONENT_KEYS if k != "layers" or name in LAYERED}
            out[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
        out["modules_to_save"] = list(self.modules_to_save)
        q = self.quantization
        out["quantization"] = None if q is None else {k: list(getattr(q, k)) if k == "components"
                                                      else getattr(q, k) for k in QUANT_KEYS}
        return out


def recipe_path(name_or_path: str | Path) -> Path:
    """A bare name looks in adapters/; a path (has a slash or a .yaml/.yml suffix) is used as is."""
    text = str(name_or_path)
    if "/" in text or text.endswith((".yaml", ".yml")):
        return Path(text)
    return RECIPE_DIR / f"{text}.yaml"


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str | Path, overrides: dict | None = None,
                source: str = "<run config>") -> Recipe:
    """Read a recipe, deep-merge `overrides` (a run config's `adapter_overrides`) and validate it.

    `source` names the run config in error messages about the overrides.
    """
    path = recipe_path(name_or_path)
    if not path.is_file():
        raise ConfigError(f"{source}: adapter: no recipe '{name_or_path}' ({path} does not exist); "
                          f"{nearest(str(name_or_path), available_recipes())}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    _check_keys(data, f"{path}: ")
    overrides = overrides or {}
    _check_keys(overrides, f"{source}: adapter_overrides.")
    recipe = Recipe(name=path.stem, file=str(path), override_source=source,
                    overridden=frozenset(_dotted_keys(overrides)))
    return _build(recipe, _deep_merge(data, overrides))


def _deep_merge(base: dict, over: dict) -> dict:
    """Mappings merge key by key; any other value (lists included) replaces the base's."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


def _dotted_keys(data: dict, prefix: str = "") -> list[str]:
    """The dotted keys of the leaves (non-mapping values) of `data`."""
    keys = []
    for key, value in data.items():
        keys += _dotted_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [prefix + str(key)]
    return keys


def _check_keys(data: Any, where: str) -> None:
    """Unknown keys anywhere in a recipe (or in overrides), before merging, so the file is known."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where.rstrip(': .')}: must be a mapping, got {type(data).__name__}")
    for key, value in data.items():
        if key not in TOP_KEYS:
            raise ConfigError(f"{where}{key}: unknown key; {nearest(key, TOP_KEYS)}")
        valid = {"quantization": QUANT_KEYS}.get(key, COMPONENT_KEYS if key in COMPONENTS else None)
        if valid is None or value is None:
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"{where}{key}: must be a mapping, got {type(value).__name__}")
        if key == "resampler":
            valid = tuple(k for k in valid if k != "layers")  # one module, no blocks
        for sub in value:
            if sub not in valid:
                hint = f"did you mean '{ALIASES[sub]}'?" if ALIASES.get(sub) in valid else nearest(sub, valid)
                raise ConfigError(f"{where}{key}.{sub}: unknown key; {hint}")


def _build(recipe: Recipe, data: dict) -> Recipe:
    description = data.get("description") or ""
    if not isinstance(description, str):
        raise ConfigError(f"{recipe.where('description')}: must be a string")
    components = {name: _component(recipe, name, data.get(name) or {}) for name in COMPONENTS}
    return Recipe(
        name=recipe.name, file=recipe.file, description=description.strip(), components=components,
        modules_to_save=_names(recipe, "modules_to_save", data.get("modules_to_save")),
        quantization=_quantization(recipe, data.get("quantization")),
        override_source=recipe.override_source, overridden=recipe.overridden,
    )


def _component(recipe: Recipe, name: str, d: dict) -> Component:
    def key(k: str) -> str:
        return recipe.where(f"{name}.{k}")

    comp = Component(
        name=name,
        modules=_names(recipe, f"{name}.modules", d.get("modules")),
        layers=d.get("layers", "all"),
        r=_number(d.get("r", 8), key("r"), int, minimum=1),
        alpha=float(_number(d.get("alpha", 16), key("alpha"), (int, float), minimum=0, strict=True)),
        dropout=float(_number(d.get("dropout", 0.0), key("dropout"), (int, float), minimum=0)),
        use_rslora=_bool(d.get("use_rslora", False), key("use_rslora")),
        use_dora=_bool(d.get("use_dora", False), key("use_dora")),
        train=_names(recipe, f"{name}.train", d.get("train")),
        lr_scale=float(_number(d.get("lr_scale", 1.0), key("lr_scale"), (int, float), minimum=0, strict=True)),
        frozen=_bool(d.get("frozen", False), key("frozen")),
    )
    if comp.dropout >= 1:
        raise ConfigError(f"{key('dropout')}: must be below 1, got {comp.dropout}")
    if comp.frozen and comp.trainable:
        what = "modules" if comp.modules else "train"
        raise ConfigError(f"{key('frozen')}: the component is frozen but {name}.{what} asks to train "
                          f"{list(getattr(comp, what))}; drop one of them")
    return comp


def _quantization(recipe: Recipe, d: dict | None) -> Quantization | None:
    if d is None:
        return None

    def key(k: str) -> str:
        return recipe.where(f"quantization.{k}")

    q = Quantization(
        bits=d.get("bits", 4), quant_type=d.get("quant_type", "nf4"),
        double_quant=_bool(d.get("double_quant", True), key("double_quant")),
        compute_dtype=d.get("compute_dtype", "bfloat16"),
        components=_names(recipe, "quantization.components", d.get("components", ["llm"])),
    )
    for k, value, valid in (("bits", q.bits, (4, 8)), ("quant_type", q.quant_type, ("nf4", "fp4")),
                            ("compute_dtype", q.compute_dtype, DTYPES)):
        if value not in valid:
            raise ConfigError(f"{key(k)}: {value!r} is not supported; {nearest(str(value), valid)}")
    for comp in q.components:
        if comp not in QUANT_COMPONENTS:
            raise ConfigError(f"{key('components')}: unknown component '{comp}'; {nearest(comp, QUANT_COMPONENTS)}")
    return q


def _names(recipe: Recipe, dotted: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{recipe.where(dotted)}: must be a list of names, got {value!r}")
    return tuple(value)


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: must be true or false, got {value!r}")
    return value


def _number(value: Any, where: str, kind: type | tuple[type, ...], minimum: float,
            strict: bool = False) -> Any:
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if not ok or value < minimum or (strict and value == minimum):
        bound = f"> {minimum}" if strict else f">= {minimum}"
        kind_name = "an integer" if kind is int else "a number"
        raise ConfigError(f"{where}: must be {kind_name} {bound}, got {value!r}")
    return value
