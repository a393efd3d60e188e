"""Grounding metrics: IoU on original-image pixels, Acc@0.5, mean IoU, parse failures.

IoU follows the official RefCOCO script: area = (x2 - x1) * (y2 - y1), no +1. A degenerate
box (zero or negative width or height, e.g. a model writing the corners swapped) has area 0,
so its IoU is 0; the original would compute a negative area there. An answer without a box
scores IoU 0 (a miss, as the original's (0,0,0,0)) and is also counted as a parse failure.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from workbench.data.boxes import GRID, Box, denormalize_box

ACC_IOU = 0.5  # a prediction is correct iff IoU >= 0.5 (the official "Precision@1")


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two pixel boxes (x1, y1, x2, y2); 0 when either is degenerate."""
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = _area(a) + _area(b) - inter
    return inter / union if union > 0 and _area(a) > 0 and _area(b) > 0 else 0.0


def _area(box: Sequence[float]) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


@dataclass
class Scored:
    """One query's outcome. `pred` is in pixels, None when the answer held no box."""

    ref: str
    answer: str
    gt: list[Box]
    pred: Box | None
    iou: float
    correct: bool
    split: str | None = None
    category: str | None = None
    image: str | None = None
    failure: str | None = None  # why `pred` is None: no box, cut box, inverted box, outside the grid

    def to_json(self) -> dict:
        return asdict(self)


def score(pred_grid: Box | None, gt: Sequence[Box], width: int, height: int, *, ref: str, answer: str,
          divisor: int = GRID, split: str | None = None, category: str | None = None,
          image: str | None = None, failure: str | None = None) -> Scored:
    """Score a grid-coordinate prediction against pixel ground truth (best IoU over `gt` boxes).

    `divisor=999` reproduces the official RefCOCO numbers (docs/qwen-vl.md §9); 1000 matches training data.
    """
    pred = None if pred_grid is None else denormalize_box(pred_grid, width, height, divisor=divisor)
    best = max((iou(pred, g) for g in gt), default=0.0) if pred is not None else 0.0
    return Scored(ref=ref, answer=answer, gt=[tuple(g) for g in gt], pred=pred, iou=best,
                  correct=best >= ACC_IOU, split=split, category=category, image=image,
                  failure=None if pred is not None else failure or "no box")


def summarize(results: Iterable[Scored]) -> dict:
    """Acc@0.5, mean IoU and parse-failure rate, overall and per split and per category."""
    results = list(results)
    report = _group_stats(results)
    for key in ("split", "category"):
        groups: dict[str, list[Scored]] = defaultdict(list)
        for r in results:
            if getattr(r, key) is not None:
                groups[getattr(r, key)].append(r)
        report[f"per_{key}"] = {name: _group_stats(rs) for name, rs in sorted(groups.items())}
    return report


def _group_stats(results: list[Scored]) -> dict:
    n = len(results)
    failures = [r.failure for r in results if r.pred is None]
    parsed = [r for r in results if r.pred is not None]
    return {
        "n": n,
        "acc@0.5": sum(r.correct for r in results) / n if n else 0.0,
        "mean_iou": sum(r.iou for r in results) / n if n else 0.0,
        "parse_failures": len(failures),
        "parse_failure_rate": len(failures) / n if n else 0.0,
        "parse_failure_kinds": {kind: failures.count(kind) for kind in sorted(set(failures))},
        # among the answers that gave a usable box: how many were wrong (the other way to miss)
        "wrong_boxes": sum(not r.correct for r in parsed),
    }
