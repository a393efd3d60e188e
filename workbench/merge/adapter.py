"""Read a PEFT LoRA adapter folder into merge instructions keyed by the base's release names.

PEFT saves `base_model.model.<module>.lora_A.weight` / `.lora_B.weight` (plus `.lora_B.bias` with
`lora_bias`, `.lora_magnitude_vector` with DoRA, `.lora_embedding_A/B` on embeddings) and
modules_to_save under their plain names (`base_model.model.lm_head.weight`). Two Qwen-VL specifics:

* `nn.MultiheadAttention` (`attn_pool.attn`): PEFT stores the in_proj delta on the module itself
  (`attn_pool.attn.lora_A.weight`, B has 3*E rows: the packed q,k,v blocks of `in_proj_weight`)
  and wraps `out_proj` as `attn_pool.attn.base_layer.out_proj.lora_A.weight`.
* PEFT (all releases up to at least the pinned 0.21.2) applies that out_proj delta twice, in
  training forwards, in PeftModel inference and in its own merge (huggingface/peft#3774, open):
  the function the adapter was trained as is W_out + 2·scale·B·A. The merge reproduces the
  adapter model, so it uses the same factor (`PEFT_MHA_OUT_PROJ_FACTOR`); the tests compare
  against PeftModel and fail if a PEFT upgrade changes this.
* QLoRA (bitsandbytes) and GPTQ-Int4 adapters use the same module names as the bf16 model, so they
  map onto the bf16 release's weights unchanged.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workbench.errors import CheckpointError
from workbench.model.checkpoint import check_finite, load_weight_file
from workbench.run_folder import read_record

PREFIX = "base_model.model."
MHA_OUT_PROJ = ".base_layer.out_proj"  # PEFT's path of an nn.MultiheadAttention's wrapped out_proj
PEFT_MHA_OUT_PROJ_FACTOR = 2
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# adapter_config.json options that change what a merge means and that this merge does not implement.
UNSUPPORTED_OPTIONS = ("fan_in_fan_out", "use_qalora", "layer_replication", "target_parameters",
                       "trainable_token_indices")


@dataclass
class LoraDelta:
    """One LoRA update of one base weight: W += scale * B @ A (then DoRA's rescale if magnitude)."""

    module: str
    A: torch.Tensor
    B: torch.Tensor
    rank: int
    alpha: float
    scale: float  # alpha/r or alpha/sqrt(r), times `factor`
    embedding: bool = False  # nn.Embedding LoRA stores the transposed product
    magnitude: torch.Tensor | None = None  # DoRA
    lora_bias: bool = False  # PEFT lora_bias: scale * lora_B.bias is added to the layer's bias
    factor: int = 1  # PEFT_MHA_OUT_PROJ_FACTOR on an MHA's out_proj: scale / factor is PEFT's `scaling`


@dataclass
class Adapter:
    path: Path
    weights_file: Path
    config: dict
    deltas: dict[str, LoraDelta] = field(default_factory=dict)        # base weight key -> delta
    bias_deltas: dict[str, torch.Tensor] = field(default_factory=dict)  # base bias key -> scale * lora_B.bias
    replacements: dict[str, torch.Tensor] = field(default_factory=dict)  # modules_to_save / trained params
    run_record: dict | None = None  # workbench_run.json of the training run, if any
    run_record_file: Path | None = None
    label: str | None = None  # how errors name it when it is not one file (a combination)

    @property
    def where(self) -> str:
        return self.label or str(self.weights_file)


def read_adapter(adapter_dir: str | Path, base_keys: set[str]) -> Adapter:
    """Parse `adapter_dir` and resolve every tensor to a key of the base checkpoint."""
    adapter_dir = Path(adapter_dir)
    config = _read_config(adapter_dir)
    weights_file = _find_weights(adapter_dir)
    tensors = load_weight_file(weights_file)
    check_finite(tensors, weights_file)
    adapter = Adapter(adapter_dir, weights_file, config)
    adapter.run_record_file, adapter.run_record = read_record(adapter_dir)

    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if not key.startswith(PREFIX):
            raise CheckpointError(f"{weights_file}: key '{key}' does not start with '{PREFIX}'; "
                                  "not a PEFT adapter of a QWenLMHeadModel")
        name = key[len(PREFIX):]
        module, part = _split_lora_key(name, weights_file)
        if part is None:
            adapter.replacements[_base_key(name, base_keys, weights_file)] = tensor
        else:
            modules.setdefault(module, {})[part] = tensor

    for module, parts in modules.items():
        _add_module(adapter, module, parts, base_keys)
    return adapter


LORA_PARTS = ("lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_magnitude_vector",
              "lora_embedding_A", "lora_embedding_B")


def _split_lora_key(name: str, where: Path) -> tuple[str, str | None]:
    for part in LORA_PARTS:
        if name.endswith("." + part):
            return name[: -len(part) - 1], part
    if ".lora_" in name:
        raise CheckpointError(f"{where}: unsupported LoRA tensor '{name}' (LoRA, rsLoRA and DoRA merge)")
    return name, None


def _add_module(adapter: Adapter, module: str, parts: dict[str, torch.Tensor], base_keys: set[str]) -> None:
    where = adapter.weights_file
    embedding = "lora_embedding_A" in parts
    A = parts.get("lora_embedding_A" if embedding else "lora_A.weight")
    B = parts.get("lora_embedding_B" if embedding else "lora_B.weight")
    if A is None or B is None:
        raise CheckpointError(f"{where}: module '{module}' has {sorted(parts)} but needs both LoRA A and B")
    # PEFT names the module by its path in the model: the MHA's out_proj sits under `base_layer`,
    # and takes its r/alpha from the MHA (the pattern key is the name before `.base_layer`).
    release = module.replace(".base_layer", "")
    pattern_name = module.split(".base_layer")[0]
    rank, alpha, scale = _scaling(adapter.config, pattern_name)
    factor = PEFT_MHA_OUT_PROJ_FACTOR if module.endswith(MHA_OUT_PROJ) else 1
    if A.shape[0] != rank or B.shape[1] != rank:
        raise CheckpointError(f"{where}: module '{module}' has rank {A.shape[0]} but adapter_config.json "
                              f"says r={rank}")
    weight_key, bias_key = _module_keys(release, base_keys, where)
    magnitude = parts.get("lora_magnitude_vector")
    if magnitude is not None and (embedding or A.dim() != 2):
        raise CheckpointError(f"{where}: DoRA on '{module}' is only supported for linear layers")
    adapter.deltas[weight_key] = LoraDelta(module, A, B, rank, alpha, factor * scale, embedding, magnitude,
                                           lora_bias="lora_B.bias" in parts, factor=factor)
    if "lora_B.bias" in parts:
        if bias_key is None:
            raise CheckpointError(f"{where}: '{module}' has lora_B.bias but the base layer has no bias")
        adapter.bias_deltas[bias_key] = scale * parts["lora_B.bias"].float()


def _scaling(config: dict, pattern_name: str) -> tuple[int, float, float]:
    # PEFT resolves per-module r and alpha with get_pattern_key on the module's name; use it verbatim
    # (imported only for an adapter with patterns: importing PEFT takes seconds, a plain merge needs none of it).
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    if rank_pattern or alpha_pattern:
        from peft.utils.other import get_pattern_key

        rank = int(rank_pattern.get(get_pattern_key(rank_pattern.keys(), pattern_name), rank))
        alpha = float(alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), pattern_name), alpha))
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return rank, alpha, scale


def _module_keys(release: str, base_keys: set[str], where: Path) -> tuple[str, str | None]:
    """(weight key, bias key or None) of a LoRA-targeted module in the base checkpoint."""
    if f"{release}.weight" in base_keys:
        bias = f"{release}.bias"
    elif f"{release}.in_proj_weight" in base_keys:  # nn.MultiheadAttention: the packed q,k,v projection
        return f"{release}.in_proj_weight", (f"{release}.in_proj_bias"
                                             if f"{release}.in_proj_bias" in base_keys else None)
    else:
        raise CheckpointError(f"{where}: LoRA module '{release}' has no weight in the base checkpoint "
                              "(adapter trained on a different model?)")
    return f"{release}.weight", bias if bias in base_keys else None


def _base_key(name: str, base_keys: set[str], where: Path) -> str:
    # PEFT saves modules_to_save under the plain module name; strip wrapper names defensively.
    key = name.replace(".modules_to_save.default", "").replace(".original_module", "")
    if key not in base_keys:
        raise CheckpointError(f"{where}: trained tensor '{name}' has no counterpart in the base checkpoint")
    return key


def _read_config(adapter_dir: Path) -> dict:
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        raise CheckpointError(f"{adapter_dir}: no adapter_config.json (not a PEFT adapter folder)")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read adapter config ({err})") from err
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: peft_type is {config.get('peft_type')!r}; only LORA adapters merge")
    if not isinstance(config.get("r"), int) or not isinstance(config.get("lora_alpha"), int | float):
        raise CheckpointError(f"{path}: needs integer 'r' and numeric 'lora_alpha'")
    for option in UNSUPPORTED_OPTIONS:
        if config.get(option):
            raise CheckpointError(f"{path}: '{option}' is set; merging such adapters is not supported")
    return config


def _find_weights(adapter_dir: Path) -> Path:
    for name in WEIGHT_FILES:
        if (adapter_dir / name).is_file():
            return adapter_dir / name
    raise CheckpointError(f"{adapter_dir}: no {' or '.join(WEIGHT_FILES)}")
