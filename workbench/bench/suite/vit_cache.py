"""Section `vit_cache`: the second epoch's step with the frozen-ViT cache (`data.vit_cache`) vs without.

official-lora (ViT and resampler frozen) on grounding-length samples, where the ViT is the
largest share of a step. The cache's pre-pass (`fill_cache`, what `workbench train` runs before
step 1) is timed once; then the same batches run as an epoch without the cache (the dataset decodes
and preprocesses each image, the model runs the ViT) and as a later epoch with it (the dataset
reads each image's features file, checked, and the model skips the ViT). Per arm: the median
optimizer step (device time) and the median collate time, the first batch a warm-up. Before any
step, both paths' losses on the first batch are compared.
"""

from __future__ import annotations

import contextlib
import statistics
import time

from workbench.bench.suite.plan import Plan
from workbench.bench.suite.recorder import Recorder


def available(plan: Plan) -> str | None:
    return None


def run(plan: Plan, rec: Recorder) -> None:
    import torch

    from workbench.bench.suite.grounding import grounding_samples
    from workbench.bench.suite.steps import model_and_optimizer, to_device
    from workbench.bench.workload import n_text_tokens
    from workbench.data.collator import SFTCollator
    from workbench.data.dataset import SFTDataset
    from workbench.data.vit_cache import fill_cache, visual_fingerprint

    model, optimizer, device = model_and_optimizer(plan)
    config = model.base_model.model.config
    size = config.visual["image_size"]
    samples = grounding_samples(config, plan.grounding_samples, plan.grounding_lengths, plan.work / "grounding")
    dataset = SFTDataset(samples, size)
    collate = SFTCollator(pad_token_id=n_text_tokens(config))
    visual = model.base_model.model.transformer.visual
    began = time.monotonic()
    fingerprint = visual_fingerprint(visual, size, str(next(visual.parameters()).dtype))
    fill = fill_cache(visual, dataset.image_paths(), plan.work / "vit-cache" / fingerprint, fingerprint, size,
                      contextlib.nullcontext)
    rec.data(prepass_s=time.monotonic() - began, images=fill.computed + fill.reused)

    def batches(cached: bool):
        dataset.vit_cache = fill.entries if cached else None
        for i in range(0, len(dataset), plan.vit_cache_batch):
            start = time.perf_counter()
            batch = collate([dataset[j] for j in range(i, min(i + plan.vit_cache_batch, len(dataset)))])
            yield batch, time.perf_counter() - start

    losses = {}
    for cached in (False, True):  # the same batch both ways, same dropout draws, before any step
        batch, _ = next(batches(cached))
        torch.manual_seed(0)
        with torch.no_grad():
            losses[cached] = float(model(**to_device(batch, device)).loss)
    rec.data(first_batch_loss_uncached=losses[False], first_batch_loss_cached=losses[True],
             loss_abs_diff=abs(losses[True] - losses[False]))
    for cached in (False, True):
        mode = "cached" if cached else "uncached"
        if not rec.fits(10):
            rec.skip(f"vit_cache: {mode}", rec.over_budget(10))
            continue
        _epoch(rec, model, optimizer, device, batches(cached), mode, plan.vit_cache_batch)


def _epoch(rec: Recorder, model, optimizer, device, batches, mode: str, per_step: int) -> None:
    from workbench.bench.suite.steps import train_step

    step_s, data_s = [], []
    for i, (batch, collate_s) in enumerate(batches):
        seconds, _ = train_step(model, optimizer, batch, device)
        if i:  # the first batch warms up
            step_s.append(seconds)
            data_s.append(collate_s)
    rec.row(mode=mode, steps=len(step_s), samples_per_step=per_step, step_s=statistics.median(step_s),
            collate_s=statistics.median(data_s), step_and_collate_s=statistics.median(
                [a + b for a, b in zip(step_s, data_s)]))
