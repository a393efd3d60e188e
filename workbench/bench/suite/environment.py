"""Section `environment`: what every row of the run was measured on (card, driver, versions)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from importlib import metadata

from workbench.bench.suite.plan import Plan
from workbench.bench.suite.recorder import Recorder

PACKAGES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "safetensors", "flash-attn", "trl",
            "open_clip_torch", "gptqmodel", "vllm")


def available(plan: Plan) -> str | None:
    return None


def package_versions() -> dict[str, str]:
    """Installed versions, read from the packages' metadata (nothing is imported)."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def driver() -> dict[str, str]:
    """nvidia-smi's driver version, per-GPU name and memory, or why there is none."""
    if shutil.which("nvidia-smi") is None:
        return {"driver": "n/a (no nvidia-smi)"}
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30)
    gpus = [line.split(", ") for line in out.stdout.strip().splitlines() if line.strip()]
    if out.returncode != 0 or not gpus:
        return {"driver": f"n/a (nvidia-smi: {(out.stderr or out.stdout).strip()[:200]})"}
    return {"driver": gpus[0][1], "nvidia_smi_gpus": "; ".join(f"{g[0]} ({g[2]})" for g in gpus)}


def commit() -> str:
    """The tree's git commit, when the tree is a git checkout (a copied tree may have no .git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(__file__))
    except OSError:
        return "unknown (no git)"
    return out.stdout.strip() if out.returncode == 0 else "unknown (not a git checkout)"


def run(plan: Plan, rec: Recorder) -> None:
    import torch

    cuda = plan.device == "cuda" and torch.cuda.is_available()
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    rec.row(device=names[0] if names else "cpu", gpus=len(names), gpu_names=names,
            gpu_memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
            cuda=torch.version.cuda, **driver(), python=platform.python_version(), cpus=os.cpu_count(),
            machine=platform.machine(), commit=commit(), versions=package_versions())
