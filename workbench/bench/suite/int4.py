"""Section `int4`: the workbench's Int4 export loaded with CUDA kernels, tokens/s and memory against bf16.

Runs where `workbench.quantize` exists (it is being built beside this suite) and gptqmodel is
installed, on a GPU: `workbench quantize` writes the Int4 export of the merge section's release,
then the bf16 release and the export each answer one greedy generation (`load_model`, `generate`)
and give their tokens/s and peak memory. Until then the section records why it did not run.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time

from workbench.bench.suite.plan import Plan
from workbench.bench.suite.recorder import Recorder

NEW_TOKENS = 64


def available(plan: Plan) -> str | None:
    if importlib.util.find_spec("workbench.quantize") is None:
        return "workbench.quantize is not in this tree (the Int4 export is being built)"
    if importlib.util.find_spec("gptqmodel") is None:
        return "gptqmodel (the Int4 CUDA kernels) is not installed"
    if plan.device != "cuda":
        return "the Int4 CUDA kernels need a GPU"
    return None


def run(plan: Plan, rec: Recorder) -> None:
    from workbench.bench.suite.merge import release_dir

    base = release_dir(plan)
    if not (base / ".complete").exists():
        rec.skip("int4", "no bf16 release: the merge section did not write it")
        return
    export = plan.work / "int4"
    cmd = [sys.executable, "-m", "workbench.cli.main", "quantize", str(base), "--out", str(export)]
    began = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=max(rec.seconds_left() - 5, 1))
    if done.returncode != 0:
        rec.skip("int4", f"`{' '.join(cmd[1:])}` failed: {(done.stderr.strip().splitlines() or ['?'])[-1][:300]}")
        return
    rec.data(quantize_s=time.monotonic() - began)
    for name, folder in (("bf16", base), ("int4", export)):
        rec.row(model=name, **_generate(folder))


def _generate(folder) -> dict:
    import torch

    from workbench import load_model

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = load_model(folder, dtype="bfloat16", device="cuda")
    ids = torch.randint(0, 1000, (1, 64), device="cuda")
    model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = out.shape[1] - ids.shape[1]
    peak = torch.cuda.max_memory_allocated() / 2**30
    del model
    return {"new_tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "peak_allocated_gib": peak}
