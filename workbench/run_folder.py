"""What a run folder holds and how to find things in it; used by `train` (writes) and `merge` (reads).

    RUN/adapter_config.json, adapter_model.safetensors   the PEFT adapter (when the run completed)
    RUN/workbench_run.json                               the run record: config, base and data fingerprints
    RUN/config.resolved.yaml                             the config with every default filled in
    RUN/metrics.jsonl, loss_curve.png, tensorboard/      what the run logged
    RUN/checkpoint-N/                                    the Trainer's checkpoints
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from workbench.errors import CheckpointError
from workbench.model.digests import sha256_file

RECORD_NAME = "workbench_run.json"
RESOLVED_CONFIG_NAME = "config.resolved.yaml"
METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "loss_curve.png"
CHECKPOINT_PREFIX = "checkpoint-"


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoint-N folders in step order.

    Not transformers' get_last_checkpoint, which takes any checkpoint-N folder: trainer_state.json
    is written last, so a folder without it is a save that was cut short and must not be resumed.
    """
    found = [p for p in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*")
             if p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def remove_incomplete_checkpoints(output_dir: Path) -> list[Path]:
    """Delete checkpoint-N folders a crash or a full disk cut short (no trainer_state.json)."""
    complete = set(checkpoints(output_dir))
    removed = [p for p in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*")
               if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit() and p not in complete]
    for folder in removed:
        shutil.rmtree(folder, ignore_errors=True)
    return removed


def run_dir_of(adapter_dir: Path) -> Path:
    """The run folder of an adapter folder: itself, or the run above a checkpoint-N folder."""
    return adapter_dir.parent if adapter_dir.name.startswith(CHECKPOINT_PREFIX) else adapter_dir


def read_record(adapter_dir: Path) -> tuple[Path | None, dict[str, Any] | None]:
    """(path, content) of the run record that belongs to an adapter folder, or (None, None)."""
    path = run_dir_of(Path(adapter_dir)) / RECORD_NAME
    if not path.is_file():
        return None, None
    try:
        return path, json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise CheckpointError(f"{path}: run record is not valid JSON ({err})") from None


def data_fingerprint(files: list[Path]) -> dict[str, str]:
    """sha256 of each data file, keyed by the path as configured."""
    return {str(path): sha256_file(Path(path)) for path in files}
