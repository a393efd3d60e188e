"""Packing: several samples in one row of at most max_length tokens, told apart by segment_ids.

`segment_ids` are 1..n for the samples of a row (0 = padding, added by the collator); the model
keeps attention inside a segment and restarts RoPE positions at 0 in each, so a packed sample
sees exactly what it would see alone. The one thing that would leak is the loss's shift: the
first label of a segment would be predicted from the previous sample's last token, so it is set
to IGNORE_INDEX (alone, position 0 is never predicted either).
"""

from __future__ import annotations

from pathlib import Path

from workbench.model.modeling import IGNORE_INDEX
from workbench.prompt import Sample


def pack(lengths: list[int], max_length: int) -> list[list[int]]:
    """Greedy, in order: start a new row when the next sample does not fit. Keeps data order
    (the sampler shuffles rows) and needs one pass; rows are rarely far from full when samples
    are much shorter than max_length."""
    rows: list[list[int]] = []
    used = max_length + 1
    for i, n in enumerate(lengths):
        if n > max_length:
            raise ValueError(f"sample {i} has {n} tokens > max_length {max_length}; apply the length policy first")
        if used + n > max_length:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


def concat(samples: list[Sample]) -> tuple[list[int], list[int], list[int], list[Path]]:
    """One packed row: input_ids, labels, segment_ids and the image files in span order."""
    ids: list[int] = []
    labels: list[int] = []
    segments: list[int] = []
    images: list[Path] = []
    for seg, s in enumerate(samples, 1):
        ids += s.input_ids
        labels += [IGNORE_INDEX, *s.labels[1:]]
        segments += [seg] * len(s)
        images += s.images
    return ids, labels, segments, images
