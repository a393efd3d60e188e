"""Section `packing`: packed vs padded batches of grounding-length samples, in real tokens per second.

The same samples (grounding.py: ~300-380 tokens, one image each) go through the training
pipeline's `SFTDataset` twice: padded (`padded_batch` samples per step, each batch padded to its
longest) and packed (`data.packing`: rows of `packing_length` tokens, one row per step, attention
kept inside each sample). Batches are collated before the clock starts, so the rows compare the
model's work (the collate time is recorded beside it); one warm-up step per arm is not counted.
"""

from __future__ import annotations

import time

from workbench.bench.suite.plan import Plan
from workbench.bench.suite.recorder import Recorder


def available(plan: Plan) -> str | None:
    return None


def run(plan: Plan, rec: Recorder) -> None:
    from workbench.bench.suite.grounding import grounding_samples, real_tokens
    from workbench.bench.suite.steps import model_and_optimizer, peak_gib, reset_peak, train_step
    from workbench.bench.workload import n_text_tokens
    from workbench.data.collator import SFTCollator
    from workbench.data.dataset import SFTDataset

    model, optimizer, device = model_and_optimizer(plan)
    config = model.base_model.model.config
    samples = grounding_samples(config, plan.grounding_samples, plan.grounding_lengths, plan.work / "grounding")
    collate = SFTCollator(pad_token_id=n_text_tokens(config))  # <|endoftext|>, the tokenizer's pad
    arm_s = 0.0
    for mode, packing, per_step in (("padded", None, plan.padded_batch), ("packed", plan.packing_length, 1)):
        if not rec.fits(arm_s):
            rec.skip(f"packing: {mode}", rec.over_budget(arm_s))
            continue
        began = time.monotonic()
        dataset = SFTDataset(samples, config.visual["image_size"], packing_length=packing)
        batches = [collate([dataset[j] for j in range(i, min(i + per_step, len(dataset)))])
                   for i in range(0, len(dataset), per_step)]
        data_s = time.monotonic() - began
        train_step(model, optimizer, batches[0], device)  # warm-up
        reset_peak(device)
        seconds = sum(train_step(model, optimizer, b, device)[0] for b in batches)
        tokens = sum(real_tokens(b) for b in batches)
        slots = sum(b["input_ids"].numel() for b in batches)
        rec.row(mode=mode, samples=len(samples), steps=len(batches), rows_per_step=per_step,
                row_tokens=packing, real_tokens=tokens, slots=slots, padding_pct=100 * (1 - tokens / slots),
                seconds=seconds, tokens_per_s=tokens / seconds, collate_s=data_s, peak_allocated_gib=peak_gib(device))
        arm_s = time.monotonic() - began
