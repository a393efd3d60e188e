"""merge_report.json: what was merged into what, and the base-fingerprint safety check."""

from __future__ import annotations

from pathlib import Path

import torch

from workbench.atomic import write_json
from workbench.errors import CheckpointError
from workbench.merge.adapter import MHA_OUT_PROJ, PEFT_MHA_OUT_PROJ_FACTOR, Adapter
from workbench.model.checkpoint import sha256_file

REPORT = "merge_report.json"


class BaseCheck:
    """The adapter's recorded base fingerprint, compared piece by piece as the merge hashes the base.

    The merge hashes each base file while it streams it (one read of the base, not two), so the
    check runs as the digests arrive: a wrong base fails on its config or first shard, and the
    output is still only a temporary folder. --force merges anyway and reports the mismatch.
    """

    def __init__(self, lora: Adapter, base_dir: Path, force: bool):
        record = lora.run_record or {}
        # `workbench train` records it as base_model.fingerprint; a flat base_fingerprint is accepted too.
        self.recorded = (record.get("base_model") or {}).get("fingerprint", record.get("base_fingerprint"))
        self.lora, self.base_dir, self.force = lora, base_dir, force
        self.mismatch = False

    def config(self, sha256: str) -> None:
        self._compare(self.recorded and self.recorded.get("config_sha256"), sha256)

    def files(self, names: list[str]) -> None:
        self._compare(self.recorded and sorted(self.recorded.get("weights") or {}), sorted(names))

    def weight(self, name: str, sha256: str) -> None:
        self._compare(self.recorded and (self.recorded.get("weights") or {}).get(name), sha256)

    def _compare(self, recorded, actual) -> None:
        if self.recorded is None or recorded == actual:
            return
        if not self.force:
            raise CheckpointError(
                f"{self.lora.run_record_file}: the adapter was trained on a different base than {self.base_dir} "
                "(base_fingerprint differs); pass --force to merge anyway")
        self.mismatch = True

    @property
    def outcome(self) -> str:
        if self.recorded is None:
            return "not checked (no base_fingerprint in the adapter's run record)"
        return "MISMATCH (merged with --force)" if self.mismatch else "match"


def quantization(lora: Adapter) -> str | None:
    """How the adapter's base was quantised during training, or None for a plain LoRA."""
    q = ((lora.run_record or {}).get("recipe") or {}).get("quantization")
    if q:  # the recipe's bitsandbytes settings, as `workbench train` records them
        return f"bitsandbytes {q.get('bits')}-bit {q.get('quant_type') if q.get('bits') == 4 else 'int8'}"
    # The official finetune.py Q-LoRA trains on Qwen/Qwen-VL-Chat-Int4 and leaves no run record.
    name = str(lora.config.get("base_model_name_or_path") or "").lower()
    return "GPTQ int4" if "int4" in name or "gptq" in name else None


def build_report(base_dir: Path, base_fingerprint: dict, lora: Adapter, done: dict[str, str],
                 dtype: torch.dtype | None, fingerprint_check: str) -> dict:
    quant = quantization(lora)
    return {
        "base": str(base_dir),
        "base_fingerprint": base_fingerprint,
        "adapter": str(lora.path),
        "adapter_fingerprint": adapter_fingerprint(lora),
        "base_fingerprint_check": fingerprint_check,
        "dtype": str(dtype).removeprefix("torch.") if dtype is not None else "unchanged (base dtypes)",
        "qlora": quant is not None,
        "quantization": quant,
        "notes": _notes(lora, quant),
        "merged_modules": [
            {"key": key, "module": d.module, "rank": d.rank, "alpha": d.alpha, "scale": d.scale,
             "dora": d.magnitude is not None, "lora_bias": d.lora_bias}
            for key, d in sorted(lora.deltas.items())
        ],
        "trained_params_written": sorted(k for k, action in done.items() if action == "trained"),
        "use_rslora": bool(lora.config.get("use_rslora")),
    }


def _notes(lora: Adapter, quant: str | None) -> list[str]:
    notes = []
    if quant:
        notes.append(f"adapter trained on a {quant}-quantised base; merged into the base's real "
                     "(unquantised) weights, not into a dequantised copy")
    if any(d.module.endswith(MHA_OUT_PROJ) for d in lora.deltas.values()):
        notes.append(f"nn.MultiheadAttention out_proj: delta merged {PEFT_MHA_OUT_PROJ_FACTOR}x, as PEFT "
                     "applies it in training and inference (huggingface/peft#3774)")
    return notes


def adapter_fingerprint(lora: Adapter) -> dict:
    return {"config_sha256": sha256_file(lora.path / "adapter_config.json"),
            "weights": {lora.weights_file.name: sha256_file(lora.weights_file)}}


def write_report(out_dir: Path, report: dict) -> None:
    write_json(out_dir / REPORT, report)
