"""The run config's `data:` section, validated once into a `DataConfig` (workbench/schema.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from workbench.schema import Invalid, build, locator, option, to_plain


@dataclass(frozen=True)
class DataConfig:
    # The names people bring from transformers, axolotl and LLaMA-Factory -> the workbench's key.
    ALIASES: ClassVar[dict[str, str]] = {
        "data_path": "train", "dataset": "train", "train_file": "train", "eval_data_path": "eval",
        "eval_file": "eval", "validation_file": "eval", "val_set_size": "eval_fraction",
        "image_folder": "image_root", "image_dir": "image_root", "model_max_length": "max_length",
        "max_seq_length": "max_length", "cutoff_len": "max_length", "sequence_len": "max_length",
        "max_len": "max_length", "dataloader_num_workers": "num_workers",
        "preprocessing_num_workers": "num_workers", "sample_packing": "packing", "chat_template": "template",
        "learning_rate": "train.lr", "per_device_train_batch_size": "train.batch_size",
    }
    train: tuple[str, ...] = option(doc="a data file or folder (JSON, JSONL, Parquet), or a list of them")
    eval: tuple[str, ...] = ()
    eval_fraction: float = option(0.0, ge=0, lt=1)  # held out of `train` when `eval` is empty
    image_root: str | None = None        # image paths are relative to this, else to the data file
    allow_outside_root: bool = False
    # How records' images are checked before training: `header` (size and file structure, fast) or
    # `decode` (every pixel, what `workbench data check` does). Larger images are refused.
    check_images: Literal["header", "decode"] = "header"
    max_image_pixels: int = option(8192 * 8192, gt=0)
    format: Literal["auto", "official", "structured", "refcoco_eval"] = "auto"
    template: str = "chatml"             # name in data_templates/ or a path to a YAML file
    system: str | None = None            # None: the record's system turn, else the template's default
    label_mode: Literal["assistant", "official"] = "assistant"
    max_length: int = option(2048, ge=1)
    overflow: Literal["truncate", "drop"] = "truncate"
    on_bad_record: Literal["error", "skip"] = "error"
    packing: bool = False
    pad_to_multiple_of: int | None = option(None, ge=1)
    num_workers: int = option(2, ge=0)
    # Frozen-ViT cache (data/vit_cache.py): the visual module's output per distinct image, computed
    # once before training and read instead of pixels. Only for recipes that train neither the ViT
    # nor the resampler. None: ~/.cache/workbench/vit ($XDG_CACHE_HOME/workbench/vit).
    vit_cache: bool = False
    vit_cache_dir: str | None = None
    # None resolves by label_mode: True for `assistant` (typed <|im_start|> etc. stay plain text, as
    # make_context encodes them at chat time), False for `official` (finetune.py made them special ids).
    escape_special_text: bool | None = None

    def __post_init__(self) -> None:
        if self.escape_special_text is None:  # resolved here, so a DataConfig built anywhere has it
            object.__setattr__(self, "escape_special_text", self.label_mode == "assistant")

    def check(self) -> None:
        if self.eval and self.eval_fraction:
            raise Invalid("eval_fraction", "give either data.eval or data.eval_fraction, not both")
        if not self.template:
            raise Invalid("template", "expected a template name or path")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, source: str = "<config>") -> DataConfig:
        return build(cls, d, locator(source), "data")

    def to_dict(self) -> dict[str, Any]:
        """Plain values, ready to be written into the resolved run config."""
        return to_plain(self)
