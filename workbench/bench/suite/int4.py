"""Section `int4`: the Int4 export on GPTQModel's CUDA kernels against bf16, tokens/s and memory.

`python -m workbench.bench.int4` (bench/int4.py) does the comparison: `workbench quantize` writes
the Int4 export of a model (calibrated on a few samples), then both models are loaded on the GPU
and score grounding queries, generate greedily (tokens/s) and report their peak memory. Here it
runs on `--wide`: random blocks of the 9.6B release's LLM width with the byte vocabulary and shapes
data (Acc@0.5 means nothing there, the speed and memory per layer do). tests/gptq/gpu_int4.sh adds
`workbench serve` and the demo's trained model.

It needs gptqmodel, which the lent GPU machine lacks: its wheels and their needs (datasets,
torchao, pyarrow, ...; torch >= 2.14.1 and transformers >= 5.20.2, newer than the machine's) do
not fit a run's carry. The same comparison on the CPU: BENCHMARKS.md (Int4 section).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

from workbench.bench.suite.plan import Plan
from workbench.bench.suite.recorder import Recorder

CALIBRATION_SAMPLES = 8
WIDE_LAYERS = 4  # blocks of the release's LLM width (bench/int4.py --wide): its own tokenizer and shapes data
ROW_FIELDS = ("generate_tokens_per_s", "peak_allocated_gib", "weights_gb", "acc@0.5")


def available(plan: Plan) -> str | None:
    if importlib.util.find_spec("workbench.gptq") is None:
        return "workbench quantize is not in this tree"
    if importlib.util.find_spec("gptqmodel") is None:
        return ("gptqmodel is not installed (not carried: with its needs it is larger than a run's carry, and it "
                "wants torch >= 2.14.1 and transformers >= 5.20.2)")
    if plan.device != "cuda":
        return "the Int4 CUDA kernels need a GPU (the CPU comparison: python -m workbench.bench.int4, BENCHMARKS.md)"
    return None


def rows_of(result: dict) -> list[dict]:
    """bench/int4.py's int4_bench.json as one row per model, with the quantisation beside the Int4 row."""
    rows = []
    for name in ("bf16", "int4"):
        row = {"model": name, **{k: result[name].get(k) for k in ROW_FIELDS}}
        if name == "int4":
            row.update(quantize_s=result.get("quantize_seconds"), calibration_samples=result.get("samples"))
        rows.append(row)
    return rows


def run(plan: Plan, rec: Recorder) -> None:
    out = plan.work / "int4"
    cmd = [sys.executable, "-m", "workbench.bench.int4", "--wide", str(WIDE_LAYERS), "--out", str(out),
           "--samples", str(CALIBRATION_SAMPLES), "--device", "cuda"]
    try:
        subprocess.run(cmd, check=True, timeout=max(rec.seconds_left() - 5, 1))
    except subprocess.TimeoutExpired:
        rec.skip("int4", f"over the section's budget: bench/int4 (GPTQ of {WIDE_LAYERS} release-width blocks, "
                         "then both models) was stopped")
        return
    for row in rows_of(json.loads((out / "int4_bench.json").read_text())):
        rec.row(**row)
