"""The run config's `data:` section, validated once into a `DataConfig`.

Every error names the YAML file and the dotted key (`configs/x.yaml: data.max_length: ...`);
an unknown key also names the closest valid one, since a typo would otherwise be ignored.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from workbench.errors import ConfigError, nearest

CHOICES = {
    "format": ("auto", "official", "structured"),
    "label_mode": ("assistant", "official"),
    "overflow": ("truncate", "drop"),
    "on_bad_record": ("error", "skip"),
}


@dataclass(frozen=True)
class DataConfig:
    train: tuple[str, ...] = ()          # files or folders (JSON, JSONL, Parquet)
    eval: tuple[str, ...] = ()
    eval_fraction: float = 0.0           # held out of `train` when `eval` is empty
    image_root: str | None = None        # image paths are relative to this, else to the data file
    allow_outside_root: bool = False
    format: str = "auto"
    template: str = "chatml"             # name in data_templates/ or a path to a YAML file
    system: str | None = None            # None: the record's system turn, else the template's default
    label_mode: str = "assistant"
    max_length: int = 2048
    overflow: str = "truncate"
    on_bad_record: str = "error"
    packing: bool = False
    pad_to_multiple_of: int | None = None
    num_workers: int = 2
    # None resolves by label_mode: True for `assistant` (typed <|im_start|> etc. stay plain text, as
    # make_context encodes them at chat time), False for `official` (finetune.py made them special ids).
    escape_special_text: bool | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, source: str = "<config>") -> DataConfig:
        d = dict(d or {})
        valid = [f.name for f in fields(cls)]
        for key in d:
            if key not in valid:
                raise ConfigError(f"{source}: data.{key}: unknown key; {nearest(key, valid)}")
        values = {k: _check(k, v, source) for k, v in d.items()}
        cfg = cls(**values)
        if not cfg.train:
            raise ConfigError(f"{source}: data.train: required (a data file or folder)")
        if cfg.eval and cfg.eval_fraction:
            raise ConfigError(f"{source}: data.eval_fraction: give either data.eval or data.eval_fraction, not both")
        if cfg.escape_special_text is None:
            cfg = cls(**{**asdict(cfg), "escape_special_text": cfg.label_mode == "assistant"})
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """Plain values, ready to be written into the resolved run config."""
        out = asdict(self)
        out["train"], out["eval"] = list(self.train), list(self.eval)
        return out


def _check(key: str, value: Any, source: str) -> Any:
    def bad(what: str) -> ConfigError:
        return ConfigError(f"{source}: data.{key}: expected {what}, got {value!r}")

    if key in ("train", "eval"):
        items = [value] if isinstance(value, str) else value
        if value is None:
            return ()
        if not isinstance(items, list) or not all(isinstance(x, str) and x for x in items):
            raise bad("a path or a list of paths")
        return tuple(items)
    if key in CHOICES:
        if value not in CHOICES[key]:
            raise bad(" | ".join(CHOICES[key]))
        return value
    if key in ("allow_outside_root", "packing"):
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if key == "escape_special_text":
        if value is not None and not isinstance(value, bool):
            raise bad("true or false")
        return value
    if key in ("image_root", "system"):
        if value is not None and not isinstance(value, str):
            raise bad("a string")
        return value
    if key == "template":
        if not isinstance(value, str) or not value:
            raise bad("a template name or path")
        return value
    if key == "eval_fraction":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise bad("a number in [0, 1)")
        return float(value)
    # max_length, num_workers, pad_to_multiple_of
    if key == "pad_to_multiple_of" and value is None:
        return None
    low = 0 if key == "num_workers" else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise bad(f"an integer >= {low}")
    return value
