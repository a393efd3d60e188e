"""Section `serving`: the vLLM plugin on CUDA against the workbench, where vLLM's environment is there.

Two parts: tests/vllm (greedy tokens and log-probabilities equal the workbench's, the LoRA adapter
against its merge) at tensor parallel 1, and 2 where the machine has two GPUs; then
serve/engines_bench.py's 1/8/32 concurrent clients against `workbench serve` and `workbench serve
--engine vllm` on the merge section's release. vLLM needs `.venv-vllm` (`make vllm`) with the CUDA
build beside `.venv`; its wheels are far larger than the 64 MiB a lent GPU machine's run can
carry, so there the section reports that it is not carried. The CPU dry run starts no vLLM (a
start takes minutes on 2 cores): it runs the throughput part against `workbench serve` alone on
the tiny model, so the launch and the parsing are exercised.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from workbench.bench.suite.plan import Plan
from workbench.bench.suite.recorder import Recorder

REPO_ROOT = Path(__file__).resolve().parents[3]
VLLM_PYTHON = REPO_ROOT / ".venv-vllm" / "bin" / "python"
WORKBENCH_VENV = REPO_ROOT / ".venv" / "bin" / "workbench"
SERVER_PACKAGES = ("fastapi", "uvicorn", "openai", "httpx")  # workbench serve and its clients


def vllm_missing() -> str | None:
    if not VLLM_PYTHON.exists() or not list(VLLM_PYTHON.parents[1].glob("lib/python*/site-packages/vllm")):
        return ("vLLM not carried: .venv-vllm with the CUDA vllm package is not on this machine "
                "(`make vllm` builds it; its wheels exceed the 64 MiB a lent GPU machine's run can carry)")
    if not WORKBENCH_VENV.exists():
        return "vLLM checks need the workbench's .venv beside .venv-vllm (tests/vllm run `workbench` from it)"
    return None


def available(plan: Plan) -> str | None:
    reason = vllm_missing() if "vllm" in plan.serve_engines else None
    missing = [p for p in SERVER_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        reason = "; ".join(filter(None, [reason, f"workbench serve cannot start: {', '.join(missing)} not installed"]))
    return reason


def run(plan: Plan, rec: Recorder) -> None:
    if "vllm" in plan.serve_engines:
        _equality(plan, rec)
    else:
        rec.skip("vllm", "the dry run starts no vLLM (minutes on the CPU); the GPU run does where .venv-vllm is "
                         f"there ({vllm_missing() or '.venv-vllm found here'})")
    _throughput(plan, rec)


def _gpus() -> int:
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return len(out.stdout.strip().splitlines()) if out.returncode == 0 else 0


def _equality(plan: Plan, rec: Recorder) -> None:
    """tests/vllm at tensor parallel 1 and 2 (tests/vllm/gpu_checks.sh without its `make` step)."""
    gpus = _gpus()
    for tp in (1, 2):
        if tp > gpus:
            rec.skip(f"vllm equality, tensor parallel {tp}", f"{gpus} GPU on this machine")
            continue
        done = subprocess.run([str(VLLM_PYTHON), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/vllm"],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=max(rec.seconds_left() / 2, 1),
                              env={**os.environ, "WORKBENCH_VLLM_TP": str(tp)})
        summary = (done.stdout.strip().splitlines() or ["no output"])[-1]
        counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", summary)}
        rec.row(part="equality", tensor_parallel=tp, passed=counts.get("passed", 0), failed=counts.get("failed", 0),
                skipped=counts.get("skipped", 0), summary=summary)


def _throughput(plan: Plan, rec: Recorder) -> None:
    model = _model(plan)
    if model is None:
        rec.skip("throughput", "no model folder: the merge section's release is not there")
        return
    out = plan.work / "engines_bench.json"
    cmd = [sys.executable, "-m", "workbench.serve.engines_bench", "--model", str(model),
           "--engines", *plan.serve_engines, "--requests", str(plan.serve_requests),
           "--concurrency", *map(str, plan.serve_concurrency), "--max-tokens", str(plan.serve_max_tokens),
           "--json", str(out), *(["--dtype", "float32"] if plan.device == "cpu" else [])]
    try:
        subprocess.run(cmd, check=True, timeout=max(rec.seconds_left() - 5, 1))
    except subprocess.TimeoutExpired:
        rec.skip("throughput", "over the section's budget: engines_bench was stopped")
        return
    for row in json.loads(out.read_text()):
        rec.row(part="throughput", **row)


def _model(plan: Plan) -> Path | None:
    from workbench.bench.suite.merge import release_dir

    if plan.tiny:
        from workbench.demo.tiny import make_tiny_model_dir

        return make_tiny_model_dir(plan.work / "serve-model")
    release = release_dir(plan)
    return release if (release / ".complete").exists() else None
