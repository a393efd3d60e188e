"""merge_report.json: what was merged into what, and the base-fingerprint safety check."""

from __future__ import annotations

from pathlib import Path

import torch

from workbench.atomic import write_json
from workbench.errors import CheckpointError
from workbench.merge.adapter import MHA_OUT_PROJ, PEFT_MHA_OUT_PROJ_FACTOR, Adapter
from workbench.model.digests import sha256_file

REPORT = "merge_report.json"


class BaseCheck:
    """The adapters' recorded base fingerprints, compared piece by piece as the merge hashes the base.

    The merge hashes each base file while it streams it (one read of the base, not two), so the
    check runs as the digests arrive: a wrong base fails on its config or first shard, and the
    output is still only a temporary folder. --force merges anyway and reports the mismatch.
    Several adapters are each compared (combine.py refused those that recorded different bases).
    """

    def __init__(self, loras: Adapter | list[Adapter], base_dir: Path, force: bool):
        loras = loras if isinstance(loras, list) else [loras]
        # `workbench train` records it as base_model.fingerprint; a flat base_fingerprint is accepted too.
        self.recorded = [(lora, _recorded(lora)) for lora in loras]
        self.recorded = [(lora, fp) for lora, fp in self.recorded if fp is not None]
        self.base_dir, self.force, self.n_adapters = base_dir, force, len(loras)
        self.mismatch = False

    @property
    def recorded_fingerprint(self) -> dict | None:
        return self.recorded[0][1] if self.recorded else None

    def config(self, sha256: str) -> None:
        self._compare(lambda fp: fp.get("config_sha256"), sha256)

    def files(self, names: list[str]) -> None:
        self._compare(lambda fp: sorted(fp.get("weights") or {}), sorted(names))

    def weight(self, name: str, sha256: str) -> None:
        self._compare(lambda fp: (fp.get("weights") or {}).get(name), sha256)

    def _compare(self, part, actual) -> None:
        for lora, fingerprint in self.recorded:
            if part(fingerprint) == actual:
                continue
            if not self.force:
                raise CheckpointError(
                    f"{lora.run_record_file}: the adapter was trained on a different base than {self.base_dir} "
                    "(base_fingerprint differs); pass --force to merge anyway")
            self.mismatch = True

    @property
    def outcome(self) -> str:
        if not self.recorded:
            return "not checked (no base_fingerprint in the adapter's run record)"
        if self.mismatch:
            return "MISMATCH (merged with --force)"
        unchecked = self.n_adapters - len(self.recorded)
        return f"match ({unchecked} of {self.n_adapters} adapters recorded no base)" if unchecked else "match"


def _recorded(lora: Adapter) -> dict | None:
    """The base the adapter merges onto: for training on an Int4 export, the 16-bit model it came from."""
    record = lora.run_record or {}
    base = record.get("base_model") or {}
    return base.get("quantized_from") or base.get("fingerprint", record.get("base_fingerprint"))


def quantization(lora: Adapter) -> str | None:
    """How the adapter's base was quantised during training, or None for a plain LoRA."""
    q = ((lora.run_record or {}).get("recipe") or {}).get("quantization")
    if q:  # the recipe's bitsandbytes settings, as `workbench train` records them
        return f"bitsandbytes {q.get('bits')}-bit {q.get('quant_type') if q.get('bits') == 4 else 'int8'}"
    if ((lora.run_record or {}).get("base_model") or {}).get("quantized_from"):
        return "GPTQ (trained on the workbench's Int4 export of this base)"
    # The official finetune.py Q-LoRA trains on Qwen/Qwen-VL-Chat-Int4 and leaves no run record.
    name = str(lora.config.get("base_model_name_or_path") or "").lower()
    return "GPTQ int4" if "int4" in name or "gptq" in name else None


def build_report(base_dir: Path, base_fingerprint: dict, sources: list[Adapter], lora: Adapter,
                 combine, done: dict[str, str], dtype: torch.dtype | None, fingerprint_check: str) -> dict:
    """merge_report.json: `lora` is what was merged (the one adapter, or the combination of `sources`)."""
    quants = [q for q in (quantization(a) for a in sources) if q]
    quant = "; ".join(dict.fromkeys(quants)) or None
    entries = adapter_entries(sources, combine)
    single = {"adapter": str(lora.path), "adapter_fingerprint": entries[0]["fingerprint"]} if combine is None else {}
    return {
        "base": str(base_dir),
        "base_fingerprint": base_fingerprint,
        **single,
        "adapters": entries,
        "combine": combine.to_dict() if combine is not None else None,
        "base_fingerprint_check": fingerprint_check,
        "dtype": str(dtype).removeprefix("torch.") if dtype is not None else "unchanged (base dtypes)",
        "qlora": quant is not None,
        "quantization": quant,
        "notes": _notes(lora, quant, combine, len(sources)),
        "merged_modules": [
            {"key": key, "module": d.module, "rank": d.rank, "alpha": d.alpha, "scale": d.scale,
             "dora": d.magnitude is not None, "lora_bias": d.lora_bias}
            for key, d in sorted(lora.deltas.items())
        ],
        "trained_params_written": sorted(k for k, action in done.items() if action == "trained"),
        "use_rslora": bool(lora.config.get("use_rslora")),
    }


def adapter_entries(sources: list[Adapter], combine) -> list[dict]:
    """Every adapter with its folder, its weight in the combination and its files' digests."""
    weights = combine.weights_for(len(sources)) if combine is not None else [1.0]
    return [{"path": str(a.path), "weight": w, "modules": len(a.deltas), "ranks": sorted({d.rank for d in a.deltas.values()}),
             "fingerprint": adapter_fingerprint(a)} for a, w in zip(sources, weights, strict=True)]


def _notes(lora: Adapter, quant: str | None, combine=None, n_adapters: int = 1) -> list[str]:
    notes = []
    if combine is not None and n_adapters == 1 and combine.method != "linear":
        notes.append(f"one adapter: combined as linear, not {combine.method} (PEFT's rule for a single adapter)")
    if combine is not None and lora.config.get("use_rslora"):
        notes.append(f"the first adapter has use_rslora, which PEFT keeps for the combination: its scaling is "
                     f"sqrt(r) = {lora.config['r'] ** 0.5:.4g}, not 1, as add_weighted_adapter makes it")
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
