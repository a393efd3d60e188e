"""The served model: one base, its PEFT adapters by name, and how a batch activates them.

A batch has a key. Rows with the same key share a batch:

* `*` (mixed): the base and every adapter whose weights PEFT's mixed-adapter inference can apply
  row by row (`adapter_names`, one name per row, `__base__` for the base). PEFT checks in every
  LoRA layer that the input has one entry per row; that holds in the LLM, not in the ViT (whose
  layers see images) or the resampler. So mixing is used while no adapter has LoRA on the vision
  side, and not for DoRA (PEFT refuses it).
* `__base__` or an adapter's name (grouped): one adapter, or the bare base, per batch, switched
  with PEFT's `set_adapter` / `disable_adapter` between batches.

Adapters that also carry fully trained base tensors (a recipe's `train` parameters, e.g. the
resampler's queries, saved beside the LoRA weights: workbench/adapters/apply.py) are loaded by PEFT
into the base itself. Here such tensors are taken back out after loading: the base keeps its own
values and each adapter's values are swapped in for its own batches, so loading one adapter never
changes the base or another adapter.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workbench.errors import CheckpointError, WorkbenchError

BASE_KEY, MIXED_KEY = "__base__", "*"
PEFT_PREFIX = "base_model.model."


@dataclass
class AdapterInfo:
    name: str
    path: Path
    vision: bool = False                    # LoRA or modules_to_save under transformer.visual
    dora: bool = False
    replaced: dict[str, torch.Tensor] = field(default_factory=dict)  # base parameter -> this adapter's value


def parse_adapter_specs(specs: list[str]) -> dict[str, Path]:
    """`NAME=DIR` (or a bare DIR, named after its folder) -> {name: folder}; names are unique."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep:
            name, folder = Path(spec).name, spec
        if not name or any(c.isspace() for c in name) or name in (BASE_KEY, MIXED_KEY):
            raise WorkbenchError(f"--adapter {spec}: expected NAME=DIR with a NAME without spaces")
        if name in out:
            raise WorkbenchError(f"--adapter {spec}: the name {name!r} is given twice")
        out[name] = Path(folder)
    return out


def default_model_name(model: str) -> str:
    """What clients call the base: a local folder's name, else the hub id as given."""
    path = Path(model)
    return path.resolve().name if path.is_dir() else model


class ServedModel:
    """The model (a PeftModel when there are adapters), its tokenizer and the names clients use."""

    def __init__(self, model, tokenizer, name: str, adapters: list[AdapterInfo] | None = None,
                 base_values: dict[str, torch.Tensor] | None = None):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.adapters = {a.name: a for a in adapters or []}
        if name in self.adapters:
            raise WorkbenchError(f"adapter name {name!r} is also the base model's name (rename one: --name)")
        self._base_values = base_values or {}
        self._applied: str | None = None   # whose replaced tensors are in the model now (None: the base's)
        self._active: str | None = ""      # the active adapter, None (the base) or MIXED_KEY; "": as loaded
        self.vision_lora = any(a.vision for a in self.adapters.values())
        self.mode = "base" if not self.adapters else "grouped" if self.vision_lora else "mixed"

    @classmethod
    def load(cls, model: str, adapters: dict[str, Path] | None = None, *, dtype: str | None = None,
             device: str | None = None, name: str | None = None) -> ServedModel:
        from workbench.api import load_model, load_tokenizer

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        base = load_model(model, dtype=dtype, device=device)
        tokenizer = load_tokenizer(model)
        served, infos, base_values = base, [], {}
        for adapter_name, folder in (adapters or {}).items():
            info, served = _load_adapter(served, base, adapter_name, Path(folder), base_values)
            infos.append(info)
        return cls(served.eval(), tokenizer, name or default_model_name(model), infos, base_values)

    @property
    def names(self) -> list[str]:
        return [self.name, *self.adapters]

    @property
    def base(self):
        """The QWenLMHeadModel itself (under the PEFT wrapper, if any)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def adapter_of(self, model_name: str) -> str | None:
        """The adapter a request's `model` names (None: the base); KeyError if it names none."""
        if model_name == self.name:
            return None
        if model_name in self.adapters:
            return model_name
        raise KeyError(model_name)

    def batch_key(self, adapter: str | None) -> str:
        if adapter is None:
            return BASE_KEY if self.vision_lora else MIXED_KEY
        info = self.adapters[adapter]
        return adapter if self.vision_lora or info.dora or info.replaced else MIXED_KEY

    def activate(self, key: str, adapters: list[str | None]) -> dict:
        """Set the model up for one forward of a batch with this key; returns extra forward kwargs.

        PEFT's switches walk every module, so the state is changed only when it differs; a batch
        whose rows all use one adapter (or the base) runs the plain forward, not the mixed one.
        """
        self._swap(key if key in self.adapters else None)
        if not self.adapters:
            return {}
        names = set(adapters)
        if key == MIXED_KEY and len(names) > 1:
            self._use(MIXED_KEY)
            return {"adapter_names": [a or BASE_KEY for a in adapters]}
        self._use(names.pop())
        return {}

    def _use(self, adapter: str | None) -> None:
        """Activate one adapter, the base (adapter layers off), or MIXED_KEY (layers on, rows choose)."""
        if adapter == self._active:
            return
        tuner = self.model.base_model
        if adapter is None:
            tuner.disable_adapter_layers()
        else:
            if self._active is None or self._active == "":
                tuner.enable_adapter_layers()
            if adapter != MIXED_KEY:
                self.model.set_adapter(adapter, inference_mode=True)
        self._active = adapter

    @torch.no_grad()
    def _swap(self, adapter: str | None) -> None:
        if adapter == self._applied:
            return
        wanted = self.adapters[adapter].replaced if adapter else {}
        for param_name, base_value in self._base_values.items():
            _parameter(self.base, param_name).copy_(wanted.get(param_name, base_value))
        self._applied = adapter


def _load_adapter(served, base, name: str, folder: Path, base_values: dict) -> tuple[AdapterInfo, object]:
    from peft import PeftModel

    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise CheckpointError(f"--adapter {name}={folder}: not a PEFT adapter folder (no adapter_config.json)")
    config = json.loads(config_file.read_text())
    info = AdapterInfo(name, folder, dora=bool(config.get("use_dora")))
    saved = config.get("modules_to_save") or []
    replaced = []
    for key in _weight_keys(folder, name):
        module = key.removeprefix(PEFT_PREFIX).rsplit(".", 1)[0]
        if ".lora_" in key or any(module == m or module.endswith("." + m) for m in saved):
            info.vision |= module.startswith("transformer.visual.")
        else:
            replaced.append(key.removeprefix(PEFT_PREFIX))
    with torch.no_grad():
        for param_name in replaced:  # the base's own value, kept before PEFT overwrites it
            base_values.setdefault(param_name, _parameter(base, param_name).detach().clone())
        if isinstance(served, PeftModel):  # not transformers' own load_adapter, which the base also has
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "Already found a `peft_config`")  # a second adapter: intended
                served.load_adapter(str(folder), adapter_name=name, is_trainable=False)
        else:
            served = PeftModel.from_pretrained(base, str(folder), adapter_name=name, is_trainable=False)
        for param_name in replaced:
            param = _parameter(base, param_name)
            info.replaced[param_name] = param.detach().clone()
            param.copy_(base_values[param_name])
    return info, served


def _weight_keys(folder: Path, name: str) -> list[str]:
    if (folder / "adapter_model.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(folder / "adapter_model.safetensors", "pt") as f:
            return list(f.keys())
    if (folder / "adapter_model.bin").is_file():
        return list(torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True))
    raise CheckpointError(f"--adapter {name}={folder}: no adapter_model.safetensors or adapter_model.bin")


def _parameter(model, name: str) -> torch.Tensor:
    """A base parameter by its release name, also when PEFT has wrapped its module (`.base_layer.`)."""
    try:
        return model.get_parameter(name)
    except AttributeError:
        module, _, leaf = name.rpartition(".")
        return model.get_parameter(f"{module}.base_layer.{leaf}")
