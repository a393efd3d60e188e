"""IoU (pixels, no +1), Acc@0.5 (IoU >= 0.5), de-normalisation, parse failures, per split/category."""

from __future__ import annotations

import pytest

from workbench.eval.metrics import iou, score, summarize


@pytest.mark.parametrize("a, b, expected", [
    ((0, 0, 10, 10), (0, 0, 10, 10), 1.0),
    ((0, 0, 10, 10), (5, 5, 15, 15), 25 / (100 + 100 - 25)),
    ((0, 0, 10, 10), (0, 0, 10, 5), 50 / 100),             # exactly 0.5
    ((0, 0, 10, 10), (10, 0, 20, 10), 0.0),                # touching edges: no +1, no overlap
    ((0, 0, 10, 10), (20, 20, 30, 30), 0.0),
    ((5, 5, 5, 10), (0, 0, 10, 10), 0.0),                  # zero width
    ((3, 3, 3, 3), (3, 3, 3, 3), 0.0),                     # two identical points: union 0
    ((10, 10, 0, 0), (0, 0, 10, 10), 0.0),                 # corners swapped: area 0, not negative
    ((0.5, 0, 2.5, 1), (1.5, 0, 3.5, 1), 1 / 3),
])
def test_iou(a, b, expected):
    assert iou(a, b) == pytest.approx(expected, abs=1e-12)
    assert iou(b, a) == pytest.approx(expected, abs=1e-12)


def test_score_denormalises_and_thresholds():
    # 200x100 image: grid (0,0),(500,1000) /1000 -> pixels (0,0,100,100); the true box is the whole
    # image, so IoU = 100*100 / (200*100) = 0.5 -> correct (>=).
    r = score((0, 0, 500, 1000), [(0, 0, 200, 100)], 200, 100, ref="x", answer="...")
    assert r.pred == (0, 0, 100, 100) and r.iou == pytest.approx(0.5) and r.correct
    r = score((0, 0, 499, 1000), [(0, 0, 200, 100)], 200, 100, ref="x", answer="...")
    assert r.iou == pytest.approx(99.8 * 100 / 20000) and not r.correct
    # /999 (official): grid 999 is the right edge exactly; /1000 stops one grid step short.
    assert score((0, 0, 999, 999), [(0, 0, 200, 100)], 200, 100, ref="x", answer="", divisor=999).pred == (0, 0, 200, 100)
    assert score((0, 0, 999, 999), [(0, 0, 200, 100)], 200, 100, ref="x", answer="").pred == pytest.approx(
        (0, 0, 199.8, 99.9))
    # Several true boxes (a category with two instances): the best match counts.
    r = score((500, 0, 1000, 1000), [(0, 0, 100, 100), (100, 0, 200, 100)], 200, 100, ref="x", answer="")
    assert r.iou == 1.0


def test_summary_counts_unparseable_answers_as_misses():
    results = [
        score((0, 0, 1000, 1000), [(0, 0, 10, 10)], 10, 10, ref="a", answer="", split="val", category="cat"),
        score((0, 0, 500, 500), [(0, 0, 10, 10)], 10, 10, ref="b", answer="", split="val", category="dog"),
        score(None, [(0, 0, 10, 10)], 10, 10, ref="c", answer="garbage", split="testA", category="cat"),
        score((5, 5, 5, 5), [(0, 0, 10, 10)], 10, 10, ref="d", answer="(5,5),(5,5)", split="testA"),
    ]
    s = summarize(results)
    assert s["n"] == 4
    assert s["acc@0.5"] == 1 / 4                        # only the first: IoU 1; second IoU 0.25
    assert s["mean_iou"] == pytest.approx((1 + 0.25 + 0 + 0) / 4)
    assert s["parse_failures"] == 1 and s["parse_failure_rate"] == 0.25
    assert s["per_split"]["val"] == {"n": 2, "acc@0.5": 0.5, "mean_iou": 0.625, "parse_failures": 0,
                                     "parse_failure_rate": 0.0, "parse_failure_kinds": {}, "wrong_boxes": 1}
    assert s["parse_failure_kinds"] == {"no box": 1} and s["wrong_boxes"] == 2
    assert s["per_split"]["testA"]["parse_failures"] == 1 and s["per_split"]["testA"]["acc@0.5"] == 0
    assert s["per_category"]["cat"]["n"] == 2 and s["per_category"]["cat"]["acc@0.5"] == 0.5
    assert set(s["per_category"]) == {"cat", "dog"}     # the uncategorised query is in no group
    assert summarize([])["acc@0.5"] == 0.0
