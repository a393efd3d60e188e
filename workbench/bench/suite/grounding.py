"""Grounding-length samples for the packing and ViT-cache sections, as the data pipeline holds them.

A grounding sample is short: one image (258 tokens), a question and a box answer, about 300-380
tokens in all. These are `Sample`s (prompt/chatml.py) of random text with one image span and a
supervised answer, each with its own image file (distinct bytes, so the ViT cache computes every
one), fed through the training pipeline's own `SFTDataset` and `SFTCollator`.
"""

from __future__ import annotations

import random
from pathlib import Path

from workbench.model.config import QWenConfig
from workbench.prompt import Sample

ANSWER_TOKENS = 24  # "<ref>the red car</ref><box>(x1,y1),(x2,y2)</box>" and the turn's end


def grounding_samples(config: QWenConfig, n: int, lengths: tuple[int, int], folder: Path, seed: int = 0
                      ) -> list[Sample]:
    """`n` samples with lengths drawn uniformly from `lengths`, their images written to `folder`."""
    from workbench.bench.workload import random_image, sample_ids

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    samples = []
    for i in range(n):
        seq_len = rng.randint(*lengths)
        ids, labels = sample_ids(config, seq_len, ANSWER_TOKENS, seed=seed * 100_000 + i)
        image = folder / f"image-{seed}-{i}.png"
        if not image.exists():
            random_image(seed * 100_000 + i).save(image)
        samples.append(Sample(input_ids=ids.tolist(), labels=labels.tolist(), turn_ends=[seq_len],
                              turn_roles=["user"], turn_images=[1], images=[image]))
    return samples


def real_tokens(batch: dict) -> int:
    """Tokens of the samples in a collated batch (padding excluded)."""
    return int(batch["attention_mask"].sum())
