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

`load_recipe(name_or_path)` finds a bare name among the built-in recipes (`adapters/`, installed as
`workbench.recipes`: workbench/builtin.py); anything with a slash or a .yaml suffix is a path. This module
checks everything that needs no model; `targets.resolve_targets` checks the rest (module
patterns that match nothing, layers out of range) and reports with `Recipe.where`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal

from workbench.builtin import builtin_dir
from workbench.dtypes import Dtype
from workbench.errors import ConfigError, nearest
from workbench.schema import Invalid, Locate, build, locator, option, read_yaml, to_plain

RECIPE_DIR = builtin_dir("recipes")
COMPONENTS = ("vit", "resampler", "llm")
LAYERED = ("vit", "llm")  # components built from numbered blocks
QUANT_COMPONENTS = (*COMPONENTS, "lm_head")


@dataclass(frozen=True)
class Component:
    name: str  # set by the loader: vit, resampler or llm
    modules: tuple[str, ...] = ()
    layers: Any = "all"  # the raw spec; targets.parse_layers resolves it against the model
    r: int = option(8, ge=1)
    alpha: float = option(16.0, gt=0)
    dropout: float = option(0.0, ge=0, lt=1)
    use_rslora: bool = False
    use_dora: bool = False
    train: tuple[str, ...] = ()
    lr_scale: float = option(1.0, gt=0)
    frozen: bool = False

    # PEFT's and finetune.py's spellings, which people will type.
    ALIASES: ClassVar[dict[str, str]] = {"lr": "lr_scale", "rank": "r", "lora_r": "r", "lora_alpha": "alpha",
                                         "lora_dropout": "dropout", "target_modules": "modules",
                                         "lora_rank": "r", "lora_target": "modules",
                                         "lora_target_modules": "modules"}

    def check(self) -> None:
        if self.frozen and self.trainable:
            what = "modules" if self.modules else "train"
            raise Invalid("frozen", f"the component is frozen but {self.name}.{what} asks to train "
                                    f"{list(getattr(self, what))}; drop one of them")

    @property
    def adapted(self) -> bool:
        return bool(self.modules)

    @property
    def trainable(self) -> bool:
        return bool(self.modules or self.train)


@dataclass(frozen=True)
class Quantization:
    bits: Literal[4, 8] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Dtype = "bfloat16"
    components: tuple[Literal["vit", "resampler", "llm", "lm_head"], ...] = ("llm",)


@dataclass(frozen=True)
class RecipeFile:
    """The shape of a recipe YAML (and of a run config's `adapter_overrides`)."""

    description: str = ""
    vit: dict[str, Any] | None = None
    resampler: dict[str, Any] | None = None
    llm: dict[str, Any] | None = None
    modules_to_save: tuple[str, ...] = ()
    quantization: Quantization | None = None


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
            out[name] = {f.name: to_plain(getattr(comp, f.name)) for f in fields(comp)
                         if f.name != "name" and (f.name != "layers" or name in LAYERED)}
        out["modules_to_save"] = list(self.modules_to_save)
        out["quantization"] = None if self.quantization is None else to_plain(self.quantization)
        return out


def is_recipe_file(name_or_path: str | Path) -> bool:
    """A path has a slash or a .yaml/.yml suffix; anything else names a built-in recipe."""
    text = str(name_or_path)
    return "/" in text or text.endswith((".yaml", ".yml"))


def recipe_path(name_or_path: str | Path) -> Path:
    """A bare name looks among the built-in recipes; a path is used as is."""
    return Path(name_or_path) if is_recipe_file(name_or_path) else RECIPE_DIR / f"{name_or_path}.yaml"


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str | Path, overrides: dict | None = None,
                source: str = "<run config>") -> Recipe:
    """Read a recipe, deep-merge `overrides` (a run config's `adapter_overrides`) and validate it.

    `source` names the run config in error messages about the overrides. The file and the
    overrides are each checked on their own first, so an unknown key is blamed on the right file.
    """
    path = recipe_path(name_or_path)
    if not path.is_file():
        raise ConfigError(f"{source}: adapter: no recipe '{name_or_path}' ({path} does not exist); "
                          f"{nearest(str(name_or_path), available_recipes())}")
    data = read_yaml(path, "recipe") or {}
    _validate(data, locator(str(path)))
    overrides = overrides or {}
    _validate(overrides, locator(source, "adapter_overrides."))
    recipe = Recipe(name=path.stem, file=str(path), override_source=source,
                    overridden=frozenset(_dotted_keys(overrides)))
    top, components = _validate(_deep_merge(data, overrides), recipe.where)
    return Recipe(
        name=recipe.name, file=recipe.file, description=top.description.strip(), components=components,
        modules_to_save=top.modules_to_save, quantization=top.quantization,
        override_source=source, overridden=recipe.overridden,
    )


def _validate(data: Any, locate: Locate) -> tuple[RecipeFile, dict[str, Component]]:
    """The recipe file's top level and its three components."""
    top = build(RecipeFile, data, locate)
    components = {}
    for name in COMPONENTS:
        section = getattr(top, name) or {}
        fixed = {"name": name} if name in LAYERED else {"name": name, "layers": "all"}  # one resampler
        components[name] = build(Component, section, locate, name, **fixed)
    return top, components


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
