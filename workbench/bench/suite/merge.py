"""Section `merge`: the full-size official-lora adapter merged on the GPU machine, against a copy.

bench/merge_load.py's pieces on that machine: the random release in the release's exact layout
(ten .bin files, 19.3 GB, drawn on the GPU), an official-lora adapter, then `merge_adapter` with
its maths on the GPU (`--device cuda`) in a child process from a cold page cache, checked by hand
on one merged tensor, and copying the same files for the ratio. The dry run does the same with
the tiny model.
"""

from __future__ import annotations

import shutil
import time

from workbench.bench.suite.plan import Plan
from workbench.bench.suite.recorder import Recorder


def available(plan: Plan) -> str | None:
    return None


def release_dir(plan: Plan):
    """Where this section writes the base model (the serving and Int4 sections read it too)."""
    return plan.work / "release"


def run(plan: Plan, rec: Recorder) -> None:
    from workbench.bench import merge_load as ml
    from workbench.demo.tiny import make_tiny_model_dir

    work = plan.work / "merge"
    began = time.monotonic()
    if plan.tiny:
        base = make_tiny_model_dir(release_dir(plan))
        shapes = ml.model_shapes(base)
    else:
        base, shapes = ml.write_release(release_dir(plan), device=plan.device), None
    adapter = ml.write_adapter(work / "adapter", shapes=shapes)
    files = ml.weight_files(base)
    rec.data(prepare_s=time.monotonic() - began, files=len(files), weight_bytes=sum(f.stat().st_size for f in files),
             largest_file_bytes=max(f.stat().st_size for f in files), device=plan.device)
    merged = work / "merged"
    code = ml.MERGE_CODE.format(base=str(base), adapter=str(adapter), out=str(merged),
                                options=f", device={plan.device!r}")
    cpu: dict = {}
    seconds, rss = ml.timed_child(code, files, cpu=cpu)
    rec.row(phase="merge", seconds=seconds, peak_rss_gb=rss / 1e9, cpu_s=cpu["user_s"] + cpu["system_s"],
            **ml.check_merge(base, adapter, merged))
    shutil.rmtree(merged)  # the disk holds the release twice, not three times
    if not rec.fits(seconds):
        rec.skip("merge: copy of the weight files", rec.over_budget(seconds))
        return
    copy = work / "copy"
    rec.row(phase="copy", seconds=ml.timed_copy(base, copy))
    shutil.rmtree(copy)
