"""Run config: one YAML file (plus `--set key=value` overrides) -> validated sections.

This module reads the file, applies overrides, checks the top level and the `train:` section,
and hands `data:` and the adapter recipe to their owners (`DataConfig.from_dict`, `load_recipe`),
which validate their own keys, so a run config is checked whole before any model is loaded. Every user error is a `ConfigError` naming the file and the
dotted key, with the nearest valid name when a key is misspelled.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from workbench.adapters.recipe import Recipe, load_recipe
from workbench.data.config import DataConfig
from workbench.errors import ConfigError, nearest

DTYPES = ("bfloat16", "float16", "float32")
TOP_LEVEL_KEYS = ("model", "dtype", "image_size", "adapter", "adapter_overrides", "data", "train")


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-5` as a float (YAML 1.1 insists on a dot: `1.0e-5`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


@dataclass
class TrainConfig:
    """The `train:` section. Defaults are the official LoRA settings (QWEN_VL_SPEC.md §7.3)."""

    output_dir: str
    # optimisation
    lr: float = 1e-5
    schedule: str = "cosine"
    optimizer: str = "adamw_torch"  # transformers' optim names; paged_adamw_8bit saves memory (QLoRA)
    warmup_ratio: float = 0.01
    warmup_steps: int = 0  # > 0 wins over warmup_ratio
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    # length of the run: max_steps > 0 wins over epochs
    epochs: float = 5.0
    max_steps: int = -1
    batch_size: int = 2  # per device
    gradient_accumulation_steps: int = 8
    eval_batch_size: int | None = None  # None: batch_size
    # numerics and memory
    precision: str = "auto"  # auto follows the top-level dtype
    gradient_checkpointing: bool = True
    loss_chunk_size: int | None = 1024  # chunked cross-entropy; None: full logits
    seed: int = 42
    # bookkeeping
    logging_steps: int = 1
    save_steps: int = 500
    save_total_limit: int | None = 3
    eval_steps: int | None = None  # None: save_steps (only when data has an eval split)
    tensorboard: bool = True

    CHOICES: typing.ClassVar[dict[str, tuple[str, ...]]] = {
        "schedule": ("cosine", "linear", "constant", "constant_with_warmup", "cosine_with_min_lr"),
        "precision": ("auto", "bf16", "fp16", "fp32"),
        "optimizer": ("adamw_torch", "adamw_torch_fused", "adamw_bnb_8bit", "paged_adamw_8bit",
                      "paged_adamw_32bit", "adafactor", "sgd"),
    }
    POSITIVE: typing.ClassVar[tuple[str, ...]] = (
        "lr", "batch_size", "gradient_accumulation_steps", "eval_batch_size", "logging_steps",
        "save_steps", "save_total_limit", "eval_steps", "loss_chunk_size", "epochs",
    )

    @classmethod
    def from_dict(cls, section: Any, source: str) -> TrainConfig:
        if not isinstance(section, dict):
            raise ConfigError(f"{source}: train: expected a mapping of training settings, got {section!r}")
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        for key in section:
            if key not in names:
                raise ConfigError(f"{source}: train.{key}: unknown key; {nearest(key, names)}")
        if "output_dir" not in section:
            raise ConfigError(f"{source}: train.output_dir: missing (the folder for the adapter and run record)")
        values = {key: _check_type(value, hints[key], f"{source}: train.{key}") for key, value in section.items()}
        config = cls(**values)
        config._check_values(source)
        return config

    def _check_values(self, source: str) -> None:
        for key, choices in self.CHOICES.items():
            value = getattr(self, key)
            if value not in choices:
                raise ConfigError(f"{source}: train.{key}: '{value}' is not one of {', '.join(choices)}"
                                  f"; {nearest(value, choices)}")
        for key in self.POSITIVE:
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"{source}: train.{key}: must be > 0, got {value}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"{source}: train.warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"{source}: train.max_steps: must be > 0 (or -1 to use train.epochs), "
                              f"got {self.max_steps}")
        for key in ("warmup_steps", "weight_decay", "max_grad_norm", "adam_epsilon"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{source}: train.{key}: must be >= 0, got {getattr(self, key)}")
        for key in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"{source}: train.{key}: must be in [0, 1), got {getattr(self, key)}")


def _check_type(value: Any, hint: Any, where: str) -> Any:
    """Check `value` against a simple type hint (int, float, bool, str, X | None); ints pass as floats."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{where}: must not be empty")
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is str and isinstance(value, str):
            return value
    wanted = " or ".join("null" if o is type(None) else o.__name__ for o in options)
    raise ConfigError(f"{where}: expected {wanted}, got {value!r}")


@dataclass
class RunConfig:
    """A whole run config, every section validated (data and recipe by their owners)."""

    source: str  # the YAML file, as named in error messages
    model: str
    dtype: str
    adapter: str
    adapter_overrides: dict[str, Any]
    recipe: Recipe
    data: DataConfig
    train: TrainConfig
    # Training resolution in pixels; None keeps the model's config.visual["image_size"]. The
    # trainer checks it against the patch size (it needs the model) and sets it on the model.
    image_size: int | None = None
    overrides: list[str] = field(default_factory=list)  # the --set arguments, for the run record

    def to_dict(self) -> dict[str, Any]:
        """The config with every train default filled in (the content of config.resolved.yaml)."""
        return {
            "model": self.model,
            "dtype": self.dtype,
            "image_size": self.image_size,
            "adapter": self.adapter,
            "adapter_overrides": self.adapter_overrides,
            "data": self.data.to_dict(),
            "train": {f.name: getattr(self.train, f.name) for f in dataclasses.fields(TrainConfig)},
        }

    def mixed_precision(self) -> str:
        """bf16 / fp16 / fp32: train.precision, with `auto` following the weights' dtype."""
        if self.train.precision != "auto":
            return self.train.precision
        return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[self.dtype]


def apply_overrides(raw: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    """Apply `key.sub=value` overrides; the value is parsed as YAML (`1e-4`, `true`, `[a, b]`, `null`)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set train.lr=1e-4")
        try:
            value = parse_yaml(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {key}: the value {text!r} is not valid YAML ({err})") from None
        node = raw
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{source}: {'.'.join(parts[:depth + 1])}: is not a mapping, "
                                  f"so --set {key} cannot go inside it")
            node = child
        node[parts[-1]] = value
    return raw


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a run config YAML, apply `--set` overrides and validate the top level and `train:`."""
    path = Path(path)
    source = str(path)
    try:
        raw = parse_yaml(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such config file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping with keys {', '.join(TOP_LEVEL_KEYS)}")
    overrides = list(overrides or [])
    raw = apply_overrides(raw, overrides, source)

    for key in raw:
        if key not in TOP_LEVEL_KEYS:
            raise ConfigError(f"{source}: {key}: unknown key; {nearest(key, TOP_LEVEL_KEYS)}")
    for key in ("model", "adapter", "data", "train"):
        if raw.get(key) is None:
            raise ConfigError(f"{source}: {key}: missing")
    for key in ("model", "adapter"):
        if not isinstance(raw[key], str):
            raise ConfigError(f"{source}: {key}: expected a string, got {raw[key]!r}")
    dtype = raw.get("dtype", "bfloat16")
    if dtype not in DTYPES:
        raise ConfigError(f"{source}: dtype: '{dtype}' is not one of {', '.join(DTYPES)}; {nearest(dtype, DTYPES)}")
    adapter_overrides = raw.get("adapter_overrides") or {}
    if not isinstance(adapter_overrides, dict):
        raise ConfigError(f"{source}: adapter_overrides: expected a mapping, got {adapter_overrides!r}")
    image_size = raw.get("image_size")
    if image_size is not None and (not isinstance(image_size, int) or isinstance(image_size, bool)
                                   or image_size <= 0):
        raise ConfigError(f"{source}: image_size: expected a size in pixels (e.g. 224) or null, got {image_size!r}")
    if not isinstance(raw["data"], dict):
        raise ConfigError(f"{source}: data: expected a mapping, got {raw['data']!r}")
    config = RunConfig(
        source=source, model=raw["model"], dtype=dtype, adapter=raw["adapter"],
        adapter_overrides=adapter_overrides,
        recipe=load_recipe(raw["adapter"], adapter_overrides, source=source),
        data=DataConfig.from_dict(raw["data"], source=source),
        train=TrainConfig.from_dict(raw["train"], source), image_size=image_size, overrides=overrides,
    )
    if config.mixed_precision() == "fp16" and dtype == "bfloat16":
        raise ConfigError(f"{source}: train.precision: fp16 autocast over bfloat16 weights mixes two half "
                          "formats; use dtype float16 (or float32) with fp16")
    return config
