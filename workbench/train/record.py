"""The run folder: preparation checks, atomic writes, and the run record (workbench_run.json)."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

import workbench
from workbench.atomic import write_text
from workbench.errors import WorkbenchError, first_line
from workbench.run_folder import METRICS_NAME, PLOT_NAME, RECORD_NAME, checkpoints, data_fingerprint
from workbench.train.config import RunFile

if TYPE_CHECKING:
    from workbench.train.config import RunConfig


def write_yaml(path: Path, data: Any) -> None:
    write_text(path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def check_output_dir(output_dir: Path, *, resume: bool) -> Path | None:
    """Check the run folder before anything slow, creating nothing; returns the checkpoint to resume from.

    Fails early (not after the weights have loaded) when the folder cannot be created or written,
    when a started run would be overwritten without --resume, or when --resume has nothing to
    resume from (an incomplete checkpoint-N, cut short by a crash, never counts).
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise WorkbenchError(f"train.output_dir: {output_dir} is a file, not a folder")
    found = checkpoints(output_dir) if output_dir.is_dir() else []
    if resume:
        if not found:
            raise WorkbenchError(f"--resume: no complete checkpoint-N folder in {output_dir} to resume from")
    elif found or (output_dir / RECORD_NAME).exists():
        raise WorkbenchError(
            f"train.output_dir: {output_dir} already holds a run; add --resume to continue it, "
            "or choose another train.output_dir")
    # The nearest folder that exists must take a new file: probe it, then leave nothing behind.
    parent = next(p for p in (output_dir, *output_dir.absolute().parents) if p.exists())
    try:
        if not parent.is_dir():
            raise NotADirectoryError(f"{parent} is a file")
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".workbench-write-probe-"):
            pass
    except OSError as err:
        raise WorkbenchError(f"train.output_dir: cannot create or write {output_dir}: "
                             f"{err.strerror or err}") from None
    if resume:
        check_pickled_files(found[-1])
        return found[-1]
    return None


def check_pickled_files(checkpoint: Path) -> None:
    """Load each pickled file of a checkpoint the way the Trainer will on resume, naming the one refused.

    The Trainer loads rng_state*.pth, optimizer.pt, scheduler.pt and scaler.pt with torch's
    weights-only unpickler and transformers' allow-list; a file holding other Python objects then
    fails deep inside `train()` with an error that names no file. Mapped (mmap), so no tensor bytes
    are read here.
    """
    import pickle

    import torch
    from transformers.trainer_pt_utils import safe_globals

    for path in sorted(p for p in checkpoint.iterdir() if p.suffix in (".pt", ".pth")):
        try:
            with safe_globals():
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
            raise WorkbenchError(f"--resume: {path}: refused ({first_line(err)}); the checkpoint's files must hold "
                                 "only tensors and plain values: resume from an earlier checkpoint-N "
                                 "or start a new run") from None


# Keys that shape the learning-rate schedule or the data order: a resumed run must keep them.
SCHEDULE_KEYS = ("lr", "schedule", "warmup_ratio", "warmup_steps", "epochs", "max_steps", "batch_size",
                 "gradient_accumulation_steps")


def check_resume(output_dir: Path, config: RunConfig, processes: int) -> list[str]:
    """On --resume: refuse keys that would silently reshape the schedule (unless
    train.allow_schedule_change_on_resume); returns the changes it allowed, as lines to print."""
    path = output_dir / RECORD_NAME
    if not path.is_file():
        return []
    try:
        before = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise WorkbenchError(f"{path}: run record is not valid JSON ({err})") from None
    old_method = before.get("config", {}).get("method", RunFile.method)
    if old_method != config.method:  # an SFT checkpoint's optimizer state is not a GRPO run's, nor back
        raise WorkbenchError(f"--resume: {config.source}: method is {config.method!r}, but the run in "
                             f"{output_dir} was {old_method!r}; start a new run (a method's init_from continues an SFT run)")
    old, new = before.get("config", {}).get("train", {}), config.to_dict()["train"]
    changed = [f"train.{k}: {old[k]!r} -> {new[k]!r}" for k in SCHEDULE_KEYS if k in old and old[k] != new[k]]
    old_processes = (before.get("sessions") or [{}])[-1].get("processes")
    if old_processes is not None and old_processes != processes:
        changed.append(f"processes: {old_processes} -> {processes} (the global batch changes)")
    if changed and not config.train.allow_schedule_change_on_resume:
        raise WorkbenchError(f"--resume: {config.source}: these change the learning-rate schedule or the batch "
                             f"of the run in {output_dir}: {'; '.join(changed)}. Set them back, or add "
                             "--set train.allow_schedule_change_on_resume=true to continue with them")
    return changed


def check_disk_space(output_dir: Path, trainable_params: int, kept_checkpoints: int) -> None:
    """Refuse to start when the checkpoints the run will keep cannot fit on the disk."""
    # One checkpoint: float32 trainable weights + two AdamW moments, plus slack for states and logs;
    # one more than kept because the newest is written before the oldest is rotated out.
    per_checkpoint = trainable_params * 4 * 3 + 16 * 2**20
    need = per_checkpoint * (kept_checkpoints + 2)
    free = shutil.disk_usage(output_dir).free
    if free < need:
        raise WorkbenchError(
            f"train.output_dir: only {free / 2**30:.2f} GiB free on the disk of {output_dir}; the adapter and "
            f"checkpoints need about {need / 2**30:.2f} GiB (lower train.save_total_limit or free some space)")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _versions() -> dict[str, str]:
    import accelerate
    import peft
    import torch
    import transformers

    return {"workbench": getattr(workbench, "__version__", "0.1.0"), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "accelerate": accelerate.__version__}


def start_run_record(output_dir: Path, config: RunConfig, trainable_params: int, data_files: list[Path],
                     resume_from: Path | None, processes: int = 1) -> dict[str, Any]:
    """The record at the start of a session; a resumed run keeps its record and adds a session.

    Resuming on other base weights is refused (the adapter would not fit them); changed data
    files only warn, since the data order then differs from the interrupted run's.
    """
    from workbench.gptq.quantize import quantized_from
    from workbench.model.checkpoint import fingerprint, resolve_model_dir

    model_dir = resolve_model_dir(config.model)
    base = {"path": str(model_dir.resolve()), "fingerprint": fingerprint(model_dir)}
    source = quantized_from(model_dir)
    if source is not None:  # an Int4 export: its adapters merge onto the 16-bit model it came from
        base["quantized_from"] = source
    data = data_fingerprint(data_files)
    path = output_dir / RECORD_NAME
    run = json.loads(path.read_text(encoding="utf-8")) if resume_from is not None and path.exists() else None
    if run is not None:
        if run["base_model"]["fingerprint"] != base["fingerprint"]:
            raise WorkbenchError(f"--resume: {config.source}: model: {config.model} is not the base model the "
                                 f"run in {output_dir} started from ({run['base_model']['path']})")
        if run["data"] != data:
            warnings.warn(f"--resume: the data files changed since the run in {output_dir} started; "
                          "the resumed run will not see the same samples in the same order", stacklevel=2)
    else:
        run = {"status": "running", "config_file": config.source, "base_model": base, "data": data,
               "sessions": []}
    run.update({
        "status": "running", "overrides": config.overrides, "config": config.to_dict(),
        "recipe": config.recipe.to_dict(), "trainable_parameters": trainable_params, "data": data,
        "versions": _versions(),
    })
    run["sessions"].append({"started": _now(), "resumed_from": resume_from.name if resume_from else None,
                            "processes": processes})
    return run


def finish_run_record(run: dict[str, Any], *, status: str, global_step: int, seconds: float,
                      metrics: list[dict[str, Any]], output_dir: Path, bad_step: int | None,
                      best_checkpoint: str | None = None) -> None:
    """Fill in how the session ended and what the run produced."""
    losses = [m["loss"] for m in metrics if "loss" in m]
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    speeds = [m["train_tokens_per_second"] for m in metrics if "train_tokens_per_second" in m]
    found = checkpoints(output_dir)
    run["status"] = status
    run["sessions"][-1].update({"ended": _now(), "seconds": round(seconds, 2), "end_step": global_step,
                                "tokens_per_second": speeds[-1] if speeds else None})
    run["result"] = {
        "global_step": global_step,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "last_eval_loss": evals[-1] if evals else None,
        "adapter": str(output_dir) if status == "completed" else None,
        "last_checkpoint": str(found[-1]) if found else None,
        "non_finite_loss_step": bad_step,
        "best_checkpoint": best_checkpoint,
        "grounding_acc@0.5": [(m["step"], m["eval_grounding_acc@0.5"]) for m in metrics
                              if "eval_grounding_acc@0.5" in m],
    }


def summary(run: dict[str, Any], output_dir: Path) -> str:
    """The lines printed at the end of a session."""
    result, session = run["result"], run["sessions"][-1]

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    speed = session["tokens_per_second"]
    lines = [
        f"{run['status']}: step {result['global_step']} in {session['seconds']:.1f} s"
        + (f", {speed:.0f} tokens/s" if speed else ""),
        f"  loss {fmt(result['first_loss'])} -> {fmt(result['last_loss'])}"
        + (f", eval loss {fmt(result['last_eval_loss'])}" if result["last_eval_loss"] is not None else ""),
    ]
    if run["status"] == "completed":
        lines.append(f"  adapter:    {output_dir}")
    elif run["status"] == "interrupted":
        lines.append(f"  checkpoint: {result['last_checkpoint']} (continue with --resume)")
    else:
        good = result["last_checkpoint"] or "none (no checkpoint was saved before it)"
        lines.append(f"  the loss became NaN/inf at step {result['non_finite_loss_step']}; nothing after the "
                     f"last good checkpoint was saved: {good}")
    lines += [f"  record:     {output_dir / RECORD_NAME}",
              f"  metrics:    {output_dir / METRICS_NAME} (plot: {output_dir / PLOT_NAME})"]
    return "\n".join(lines)
