"""Section `training`: the workbench's training step per recipe and length, with the memory estimate.

The steps are `workbench bench`'s (bench/run.py: random weights of the real size built on the GPU,
the recipe applied as `workbench train` does, one warm-up step, the median of the measured ones).
Each row also holds what `workbench inspect --seq-len N --batch-size 1` estimates for that step
(weights + trainable state + activations, adapters/inspect.py), computed on the meta device before
the recipe's model is built, against `torch.cuda.max_memory_allocated` over the row's steps.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

from workbench.bench.suite.plan import Plan
from workbench.bench.suite.recorder import Recorder

GiB = 2**30
NEEDS = {"qlora": "bitsandbytes"}  # recipe -> package it cannot run without


def available(plan: Plan) -> str | None:
    return None


def estimate_dir(plan: Plan) -> Path:
    """A folder whose config.json is the benchmark model's (the release's, or the tiny one)."""
    from workbench.bench.workload import bench_config
    from workbench.model.checkpoint import RELEASES_DIR

    if not plan.tiny:
        return RELEASES_DIR / "Qwen--Qwen-VL-Chat"
    folder = plan.work / "tiny-config"
    bench_config(tiny=True).save_pretrained(folder)
    return folder


def estimates(plan: Plan, recipe: str, dtype: str) -> dict[int, int]:
    """`inspect --seq-len N --batch-size 1` per length: step total in bytes, under the bench's settings
    (every block checkpointed, the bench's loss chunk, one image per sample)."""
    from workbench.adapters.activations import StepShape
    from workbench.adapters.inspect import inspect_recipe
    from workbench.adapters.recipe import load_recipe
    from workbench.bench.run import LOSS_CHUNK_SIZE

    folder, recipe_obj = estimate_dir(plan), load_recipe(recipe)
    out = {}
    for seq_len in plan.seq_lens:
        step = StepShape(seq_len=seq_len, batch_size=1, images_per_sample=1, gradient_checkpointing=True,
                         checkpoint_every=1, loss_chunk_size=LOSS_CHUNK_SIZE)
        out[seq_len] = inspect_recipe(folder, recipe_obj, dtype, step=step)["memory_bytes"]["step_total"]
    return out


def missing_package(recipe: str) -> str | None:
    package = NEEDS.get(recipe)
    if package and importlib.util.find_spec(package) is None:
        return f"{package} is not installed (carry its wheel: BENCHMARKS.md, GPU section)"
    return None


def run(plan: Plan, rec: Recorder) -> None:
    import torch

    from workbench.bench.flops import datasheet_peak
    from workbench.bench.run import matmul_rate

    device = torch.device(plan.device)
    cuda = device.type == "cuda"
    rate = matmul_rate(device, torch.bfloat16 if cuda else torch.float32)
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak = datasheet_peak(name)
    rec.data(device=name, matmul_tflops=rate / 1e12, datasheet_tflops=peak / 1e12 if peak else None,
             dtype="bfloat16" if cuda else "float32", steps=plan.steps, grad_accum=plan.grad_accum)
    first_row_s = 0.0  # the last recipe's estimates, build and first length: what the next one needs
    for recipe in plan.recipes:
        reason = missing_package(recipe)
        if reason:
            _skip_rest(rec, recipe, plan.seq_lens, reason)
            continue
        first_row_s = _recipe(plan, rec, recipe, device, rate, peak, first_row_s) or first_row_s
        if cuda:
            torch.cuda.empty_cache()


def _recipe(plan: Plan, rec: Recorder, recipe: str, device, rate: float, peak: float | None,
            first_row_s: float) -> float | None:
    """One recipe's rows; returns how long its first row took (estimates and build included)."""
    from workbench.bench.run import iter_bench

    if not rec.fits(first_row_s):
        _skip_rest(rec, recipe, plan.seq_lens, rec.over_budget(first_row_s))
        return None
    start = time.monotonic()
    cuda = device.type == "cuda"
    estimate = estimates(plan, recipe, "bfloat16" if cuda else "float32")
    rows = iter_bench(recipe, list(plan.seq_lens), rate=rate, steps=plan.steps, grad_accum=plan.grad_accum,
                      tiny=plan.tiny, device=device)
    first, expected = None, 0.0
    try:
        for i, seq_len in enumerate(plan.seq_lens):
            if i and not rec.fits(expected):
                _skip_rest(rec, recipe, plan.seq_lens[i:], rec.over_budget(expected))
                break
            try:
                r = next(rows)
            except Exception as err:  # e.g. out of memory, a kernel the card lacks: the next recipe still runs
                _skip_rest(rec, recipe, plan.seq_lens[i:], f"{type(err).__name__}: {str(err).splitlines()[0][:300]}")
                break
            seconds = time.monotonic() - start
            first = first or seconds
            rec.row(**_row(r, estimate[seq_len], peak), seconds=seconds)
            # the next length: its steps (warm-up included), which grow about with the length
            if i + 1 < len(plan.seq_lens):
                expected = r.s_per_it * (plan.steps + 1) * plan.seq_lens[i + 1] / seq_len
            start = time.monotonic()
    finally:
        rows.close()
    return first


def _row(r, estimate_bytes: int, peak: float | None) -> dict:
    measured = r.peak_allocated_gib
    estimate = estimate_bytes / GiB
    return {"recipe": r.recipe, "seq_len": r.seq_len, "s_per_it": r.s_per_it, "tokens_per_s": r.tokens_per_s,
            "tflops": r.tflops, "pct_of_matmul": r.pct_of_matmul,
            "mfu_pct": 100 * r.tflops * 1e12 / peak if peak else None,
            "peak_allocated_gib": measured, "peak_reserved_gib": r.peak_reserved_gib,
            "trainable_params": r.trainable_params, "estimate_gib": estimate,
            "estimate_error_pct": 100 * (estimate - measured) / measured if measured else None}


def _skip_rest(rec: Recorder, recipe: str, seq_lens, reason: str) -> None:
    for seq_len in seq_lens:
        rec.skip(f"{recipe} @ {seq_len}", reason)
