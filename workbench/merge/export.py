"""`--adapter-out`: the combined adapter as a PEFT adapter folder instead of merged weights.

The folder is what `save_pretrained` writes after `add_weighted_adapter`: adapter_config.json
with r = lora_alpha = the combined rank and no rank/alpha patterns, and every module's A and B
padded with zeros to that rank (zero rows of A and columns of B add nothing to B @ A), so PEFT,
`workbench serve` and, for an LLM-only adapter, vLLM load it as one plain LoRA. Fully trained
tensors (modules_to_save, a recipe's `train`) go under their plain names, as save_adapter puts
them. workbench_run.json names the base fingerprint the adapters recorded, so merging the result
later still checks its base, and the adapters, weights and method it came from.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from workbench.atomic import atomic_path, write_json
from workbench.merge.adapter import PREFIX, Adapter
from workbench.merge.report import BaseCheck, adapter_entries
from workbench.model.digests import sha256_file
from workbench.run_folder import RECORD_NAME

WEIGHTS = "adapter_model.safetensors"


def adapter_tensors(lora: Adapter) -> dict[str, torch.Tensor]:
    """PEFT's state-dict names -> tensors of the combined adapter, each module at rank r."""
    rank = lora.config["r"]
    tensors = {}
    for delta in lora.deltas.values():
        A, B = _pad(delta.A, delta.B, rank)
        prefix = PREFIX + delta.module
        names = ((f"{prefix}.lora_embedding_A", f"{prefix}.lora_embedding_B") if delta.embedding
                 else (f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"))
        tensors.update(zip(names, (A, B), strict=True))
    tensors.update({PREFIX + key: value for key, value in lora.replacements.items()})
    return {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}


def _pad(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    missing = rank - A.shape[0]
    if missing < 0:
        raise ValueError(f"module rank {A.shape[0]} above the adapter's r={rank}")
    A = torch.cat([A, A.new_zeros((missing, *A.shape[1:]))], dim=0)
    B = torch.cat([B, B.new_zeros((B.shape[0], missing, *B.shape[2:]))], dim=1)
    return A, B


def write_adapter_files(out_dir: Path, lora: Adapter) -> None:
    """adapter_config.json + adapter_model.safetensors of the combined adapter in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "adapter_config.json", lora.config)
    with atomic_path(out_dir / WEIGHTS) as tmp:
        save_file(adapter_tensors(lora), tmp, metadata={"format": "pt"})


def write_combined_adapter(out_dir: Path, lora: Adapter, sources: list[Adapter], combine, base_dir: Path,
                           base_fingerprint: dict, base_check: BaseCheck) -> dict:
    """The combined adapter folder with its run record; returns the report (merge_report.json)."""
    write_adapter_files(out_dir, lora)
    recorded = base_check.recorded_fingerprint
    entries = adapter_entries(sources, combine)
    record = {"base_model": {"path": str(base_dir), **({"fingerprint": recorded} if recorded else {})},
              "combine": {**combine.to_dict(), "adapters": entries}}
    write_json(out_dir / RECORD_NAME, record)
    return {
        "base": str(base_dir),
        "base_config_sha256": base_fingerprint["config_sha256"],
        "base_fingerprint_check": f"config.json: {base_check.outcome} (weights not read with --adapter-out)",
        "adapters": entries,
        "combine": combine.to_dict(),
        "adapter_out": {"r": lora.config["r"], "lora_alpha": lora.config["lora_alpha"],
                        "modules": len(lora.deltas), "trained_tensors": sorted(lora.replacements),
                        "weights_sha256": sha256_file(out_dir / WEIGHTS),
                        "config": json.loads((out_dir / "adapter_config.json").read_text())},
    }
