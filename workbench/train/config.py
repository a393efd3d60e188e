"""Run config: one YAML file (plus `--set key=value` overrides) -> one validated `RunConfig`.

Every section is a frozen dataclass validated by `workbench/schema.py` (types, choices, bounds,
"did you mean"); this module declares the top level and the `train:` section, and the owners
declare theirs (`DataConfig` in `workbench/data/config.py`, the adapter recipe in
`workbench/adapters/recipe.py`), so a run config is checked whole before any model is loaded.
Every error is a `ConfigError` naming the file and the dotted key.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from workbench.adapters.recipe import Recipe, is_recipe_file, load_recipe
from workbench.data.config import DataConfig
from workbench.dtypes import PRECISION_FLAGS, Dtype
from workbench.errors import ConfigError
from workbench.schema import Invalid, build, locator, option, parse_yaml, read_yaml, to_plain, yaml_problem

Schedule = Literal["cosine", "linear", "constant", "constant_with_warmup", "cosine_with_min_lr"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
# transformers' optim names; paged_adamw_8bit saves memory (QLoRA)
Optimizer = Literal["adamw_torch", "adamw_torch_fused", "adamw_bnb_8bit", "paged_adamw_8bit",
                    "paged_adamw_32bit", "adafactor", "sgd"]


Tracker = Literal["tensorboard", "wandb", "mlflow", "none"]
# The training methods: each name is a module in workbench/train/methods/ and, when the method has
# settings, a section of the same name below (RunFile).
Method = Literal["sft", "grpo", "dpo"]
# TRL's DPO loss types (trl.trainer.dpo_trainer, pinned in constraints.txt); several are summed with
# their weights, e.g. RPO = {sigmoid: 1.0, sft: alpha}.
DPOLoss = Literal["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]
DPO_LOSSES = typing.get_args(DPOLoss)


@dataclass(frozen=True)
class GroundingEval:
    """`train.eval_grounding`: Acc@0.5 on held-out grounding data while training (the same code as
    `workbench eval grounding`), logged to every tracker and metrics.jsonl."""

    data: tuple[str, ...] = ()          # held-out files (any data format); empty: the data section's `eval`
    image_root: str | None = None       # default: the data section's image_root
    every: int | None = option(None, gt=0)  # steps between evaluations; None: train.eval_steps or save_steps
    batch_size: int = option(8, gt=0)
    max_samples: int | None = option(64, gt=0)  # the first N queries; None: all
    prompt: str = "chat"                # official | chat | a ChatML prompt with <ref-object>
    max_new_tokens: int | None = option(None, gt=0)  # None: suited to the prompt kind
    images: int = option(4, ge=0)       # PNGs drawn per evaluation (first N queries)


# Names other tools (transformers, PEFT, axolotl, LLaMA-Factory) use for what another section of a
# run config holds: the dotted key from the top of the file, for "did you mean".
ELSEWHERE = {
    "model_max_length": "data.max_length", "max_seq_length": "data.max_length", "cutoff_len": "data.max_length",
    "sequence_len": "data.max_length", "lora_r": "adapter_overrides.llm.r", "lora_rank": "adapter_overrides.llm.r",
    "lora_alpha": "adapter_overrides.llm.alpha", "lora_dropout": "adapter_overrides.llm.dropout",
    "lora_target": "adapter_overrides.llm.modules", "lora_target_modules": "adapter_overrides.llm.modules",
    "target_modules": "adapter_overrides.llm.modules",
}


@dataclass(frozen=True)
class TrainConfig:
    """The `train:` section. Defaults are the official LoRA settings (docs/qwen-vl.md, finetune.py)."""

    # The names people bring from transformers, PEFT, axolotl and LLaMA-Factory -> the workbench's key.
    ALIASES: ClassVar[dict[str, str]] = {
        "learning_rate": "lr", "num_train_epochs": "epochs", "num_epochs": "epochs",
        "per_device_train_batch_size": "batch_size", "micro_batch_size": "batch_size",
        "per_device_eval_batch_size": "eval_batch_size", "lr_scheduler_type": "schedule",
        "lr_scheduler": "schedule", "optim": "optimizer", "bf16": "precision", "fp16": "precision",
        "max_steps_per_epoch": "max_steps", "early_stopping": "early_stopping_patience",
        **ELSEWHERE,
    }

    output_dir: str = option(doc="the folder for the adapter and run record")
    # optimisation
    lr: float = option(1e-5, gt=0)
    schedule: Schedule = "cosine"
    optimizer: Optimizer = "adamw_torch"
    warmup_ratio: float = option(0.01, ge=0, lt=1)
    warmup_steps: int = option(0, ge=0)  # > 0 wins over warmup_ratio
    weight_decay: float = option(0.1, ge=0)
    adam_beta1: float = option(0.9, ge=0, lt=1)
    adam_beta2: float = option(0.95, ge=0, lt=1)
    adam_epsilon: float = option(1e-8, ge=0)
    max_grad_norm: float = option(1.0, ge=0)
    # length of the run: max_steps > 0 wins over epochs
    epochs: float = option(5.0, gt=0)
    max_steps: int = option(-1, ge=-1)
    batch_size: int = option(2, gt=0)  # per device
    gradient_accumulation_steps: int = option(8, gt=0)
    eval_batch_size: int | None = option(None, gt=0)  # None: batch_size
    # numerics and memory
    precision: Precision = "auto"  # auto follows the top-level dtype
    gradient_checkpointing: bool = True
    checkpoint_every: int = option(1, gt=0)  # with checkpointing: LLM blocks 0, k, 2k, ... recompute (1 = all)
    loss_chunk_size: int | None = option(1024, gt=0)  # chunked cross-entropy; None: full logits
    seed: int = 42
    # bookkeeping
    logging_steps: int = option(1, gt=0)
    save_steps: int = option(500, gt=0)
    save_total_limit: int | None = option(3, gt=0)
    eval_steps: int | None = option(None, gt=0)  # None: save_steps (only when data has an eval split)
    report_to: tuple[Tracker, ...] = ("tensorboard",)  # transformers' integrations; none: only metrics.jsonl
    eval_grounding: GroundingEval | None = None
    # Keep the best checkpoint by an evaluation metric (e.g. grounding_acc@0.5, loss) and make it the
    # final adapter; early stopping ends the run after `early_stopping_patience` evaluations without gain.
    metric_for_best: str | None = None
    greater_is_better: bool | None = None  # None: true for accuracies and IoU, false for losses
    early_stopping_patience: int | None = option(None, gt=0)
    # Allow --resume with keys that reshape the schedule (max_steps, epochs, lr, schedule, warmup, batch).
    allow_schedule_change_on_resume: bool = False

    def check(self) -> None:
        if self.max_steps == 0:
            raise Invalid("max_steps", "must be > 0 (or -1 to use train.epochs), got 0")
        if "none" in self.report_to and len(self.report_to) > 1:
            raise Invalid("report_to", "'none' cannot be combined with a tracker")
        if self.early_stopping_patience is not None and self.metric_for_best is None:
            raise Invalid("early_stopping_patience", "needs train.metric_for_best (the metric that must improve)")
        if self.metric_for_best is not None:
            every = self.evaluation_steps()
            if self.save_steps % every:
                raise Invalid("save_steps", f"must be a multiple of the evaluation interval ({every} steps) "
                                            "so that the best evaluation has a checkpoint")

    def evaluation_steps(self) -> int:
        """Steps between evaluations (loss and grounding)."""
        grounding = self.eval_grounding.every if self.eval_grounding else None
        return grounding or self.eval_steps or self.save_steps


@dataclass(frozen=True)
class GRPOConfig:
    """The `grpo:` section (with `method: grpo`): group-relative policy optimisation on grounding
    queries (docs/grpo.md). Each optimizer step samples `num_generations` answers per prompt,
    scores them with the weighted rewards and trains on the group-normalised advantages."""

    num_generations: int = option(8, ge=2)      # G answers per prompt (one group)
    temperature: float = option(1.0, gt=0)
    top_p: float = option(1.0, gt=0, le=1)
    max_new_tokens: int = option(64, gt=0)
    beta: float = option(0.0, ge=0)             # KL weight (to the base: the adapters disabled)
    epsilon: float = option(0.2, gt=0, lt=1)    # ratio clip range [1 - eps, 1 + eps]
    # optimizer steps on one rollout; > 1 makes the ratio differ from 1 and the clipping matter
    iterations: int = option(1, gt=0)
    # name -> weight: built-ins (iou, acc@0.5, format) or `module:function` (rewards.py)
    rewards: dict[str, Any] = field(default_factory=lambda: {"iou": 1.0})
    init_from: str | None = None               # an SFT run folder whose adapter GRPO continues; None: base
    prompt: str = "chat"                       # the grounding prompt (as train.eval_grounding.prompt)
    # control experiment: each prompt gets another prompt's image (the reward still uses its own box)
    shuffle_images: bool = False

    def check(self) -> None:
        from workbench.train.rewards import check_reward_spec

        check_reward_spec(self.rewards)


@dataclass(frozen=True)
class DPOConfig:
    """The `dpo:` section (with `method: dpo`): direct preference optimisation on pairs of answers
    to one prompt (docs/dpo.md), with TRL's loss code. The reference policy is the model with its
    adapters disabled; `init_from` continues an SFT run's adapter."""

    beta: float = option(0.1, gt=0)             # the implicit reward's scale (IPO: its regulariser)
    # TRL loss type -> weight, summed; RPO (DPO + an SFT term on the chosen answer) is {sigmoid: 1.0, sft: 1.0}
    loss: dict[DPOLoss, float] = field(default_factory=lambda: {"sigmoid": 1.0})  # check() validates it
    label_smoothing: float = option(0.0, ge=0, lt=0.5)  # robust / exo_pair / aot: the share of flipped labels
    init_from: str | None = None               # an SFT run folder whose adapter DPO continues; None: base
    # control experiment: each prompt is trained on another prompt's pair (its images stay its own)
    shuffle_pairs: bool = False

    def check(self) -> None:
        if not self.loss:
            raise Invalid("loss", "give at least one TRL loss type and its weight, e.g. {sigmoid: 1.0}")
        for name, weight in self.loss.items():
            if name not in DPO_LOSSES:
                from workbench.errors import nearest

                raise Invalid(f"loss.{name}", f"unknown DPO loss type; {nearest(name, DPO_LOSSES)}")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight == weight \
                    or abs(weight) == float("inf"):
                raise Invalid(f"loss.{name}", f"the weight must be a finite number, got {weight!r}")
        if "exo_pair" in self.loss and self.label_smoothing == 0:
            raise Invalid("label_smoothing", "exo_pair needs a label_smoothing > 0 (it takes log(label_smoothing))")


@dataclass(frozen=True)
class RunFile:
    """The top level of a run config file: every key a YAML file may hold, declared once."""

    ALIASES: ClassVar[dict[str, str]] = {
        "model_name_or_path": "model", "base_model": "model", "torch_dtype": "dtype", "recipe": "adapter",
        "learning_rate": "train.lr", "lr": "train.lr", "num_train_epochs": "train.epochs",
        "per_device_train_batch_size": "train.batch_size", "output_dir": "train.output_dir",
        "data_path": "data.train", "dataset": "data.train", "train_file": "data.train",
        **ELSEWHERE,
    }

    model: str = option(doc="a Qwen-VL-Chat folder or hub id")
    adapter: str = option(doc="a recipe name in adapters/ or a path to a recipe YAML")
    data: DataConfig = option(doc="the data section")
    train: TrainConfig = option(doc="the train section")
    dtype: Dtype = "bfloat16"
    # Training resolution in pixels; None keeps the model's config.visual["image_size"]. The
    # trainer checks it against the patch size (it needs the model) and sets it on the model.
    image_size: int | None = option(None, gt=0)
    adapter_overrides: dict[str, Any] | None = None
    method: Method = "sft"
    # one section per method that has settings, named as the method (filled with defaults when absent)
    grpo: GRPOConfig | None = None
    dpo: DPOConfig | None = None


def method_sections() -> dict[str, type]:
    """Method name -> its section's dataclass, for the methods that have one."""
    hints = typing.get_type_hints(RunFile)
    return {name: next(t for t in typing.get_args(hints[name]) if t is not type(None))
            for name in typing.get_args(Method) if name in hints}


@dataclass(frozen=True)
class RunConfig(RunFile):
    """A whole run config: the file's sections validated, the method's section filled in, the recipe loaded."""

    source: str = "<config>"  # the YAML file, as named in error messages
    recipe: Recipe | None = None
    overrides: tuple[str, ...] = ()  # the --set arguments, for the run record

    def to_dict(self) -> dict[str, Any]:
        """The config with every default filled in (the content of config.resolved.yaml)."""
        out = {
            "model": self.model,
            "dtype": self.dtype,
            "image_size": self.image_size,
            "adapter": self.adapter,
            "adapter_overrides": self.adapter_overrides,
            "data": self.data.to_dict(),
            "train": to_plain(self.train),
        }
        section = getattr(self, self.method, None)
        if self.method != RunFile.method or section is not None:
            out["method"] = self.method
        if section is not None:
            out[self.method] = to_plain(section)
        return out

    def mixed_precision(self) -> str:
        """bf16 / fp16 / fp32: train.precision, with `auto` following the weights' dtype."""
        return PRECISION_FLAGS[self.dtype] if self.train.precision == "auto" else self.train.precision


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
            raise ConfigError(f"--set {key}: the value {text!r} is not valid YAML ({yaml_problem(err)})") from None
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


def _method_sections(top: RunFile, source: str) -> dict[str, Any]:
    """The method's own section, with its defaults when the file leaves it out; another method's
    section is refused (it would be silently ignored)."""
    out = {}
    for name, cls in method_sections().items():
        given = getattr(top, name)
        if name == top.method:
            out[name] = given or cls()
        elif given is not None:
            raise ConfigError(f"{source}: {name}: given, but method is {top.method!r}; add `method: {name}`")
    return out


def _recipe_beside_config(raw: dict[str, Any], path: Path) -> None:
    """A recipe given by a relative path in a config file lies beside that file (a `--set` path is cwd's)."""
    adapter = raw.get("adapter")
    if isinstance(adapter, str) and is_recipe_file(adapter) and not Path(adapter).is_absolute():
        raw["adapter"] = str(path.parent / adapter)


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a run config YAML, apply `--set` overrides and validate every section."""
    source = str(path)
    raw = read_yaml(path, "config file")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of run settings (model, adapter, data, train, ...)")
    _recipe_beside_config(raw, Path(source))
    overrides = list(overrides or [])
    raw = apply_overrides(raw, overrides, source)
    top = build(RunFile, raw, locator(source))
    adapter_overrides = top.adapter_overrides or {}
    config = RunConfig(
        **{f.name: getattr(top, f.name) for f in fields(RunFile)},
        source=source, recipe=load_recipe(top.adapter, adapter_overrides, source=source), overrides=tuple(overrides),
    )
    config = replace(config, adapter_overrides=adapter_overrides, **_method_sections(top, source))
    if config.data.vit_cache:
        for name in ("vit", "resampler"):
            if config.recipe.components[name].trainable:
                raise ConfigError(f"{source}: data.vit_cache: the recipe trains the {name} "
                                  f"({config.recipe.where(name)}); the cache holds the frozen visual "
                                  "module's output, so set data.vit_cache: false or freeze the ViT and resampler")
    if config.mixed_precision() == "fp16" and top.dtype == "bfloat16":
        raise ConfigError(f"{source}: train.precision: fp16 autocast over bfloat16 weights mixes two half "
                          "formats; use dtype float16 (or float32) with fp16")
    return config
