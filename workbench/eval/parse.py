"""Boxes from model answers.

`parse_boxes` reads what a (possibly badly trained) model writes and never raises: tagged
`<ref>..</ref><box>(x1,y1),(x2,y2)</box>` runs, answers decoded with special tokens skipped
(`a dog(12,34),(560,780)`), missing or unclosed brackets, several boxes, `[x1, y1, x2, y2]`
lists, garbage. Coordinates stay on the model's grid; `metrics` de-normalises them.

A box that cannot be a real answer is kept with its `problem`, so that evaluation counts it as a
parse failure (not as a wrong box): a `<box>` that never closes (generation was cut), corners in the
wrong order (x2 < x1 or y2 < y1), or a coordinate outside the [0, 1000) grid.

`parse_official` is the RefCOCO evaluation's parser (eval_mm/evaluate_grounding.py): the first
match of `\\((.*?)\\),\\((.*?)\\)`, anything else is a failure (the original writes (0,0,0,0)).
"""

from __future__ import annotations

import re
from typing import NamedTuple

from workbench.data.boxes import GRID, Box

_NUM = r"-?\d+(?:\.\d+)?"
_PAIR = rf"\s*({_NUM})\s*,\s*({_NUM})\s*"
# One pass over the answer; the first alternative that matches at a position wins.
_TOKEN = re.compile(
    r"<ref>(?P<ref>.*?)(?:</ref>|(?=<box>|<ref>)|$)"  # unclosed <ref> ends at the next tag
    r"|<box>(?P<box>.*?)(?:</box>|(?=<box>|<ref>)|$)"
    rf"|\(?{_PAIR}\)\s*,?\s*\({_PAIR}\)?"  # (x1,y1),(x2,y2); either outer bracket may be missing
    rf"|\[\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*\]",  # [x1, y1, x2, y2]
    re.DOTALL,
)
_OFFICIAL = re.compile(r"\((.*?)\),\((.*?)\)")


class ParsedBox(NamedTuple):
    ref: str | None
    box: Box
    problem: str | None = None  # why the box is unusable: cut box | inverted box | outside the grid


def parse_boxes(text: str) -> list[ParsedBox]:
    """Every box in `text`, each with the ref it follows (None when no `<ref>` came before)."""
    found: list[ParsedBox] = []
    ref: str | None = None
    for match in _TOKEN.finditer(text):
        if match.group("ref") is not None:
            ref = match.group("ref").strip() or None
            continue
        cut = False
        if match.group("box") is not None:
            numbers = re.findall(_NUM, match.group("box"))
            if len(numbers) < 4:
                continue  # `<box>garbage</box>`: no box, keep scanning
            cut = not match.group(0).endswith("</box>") or len(numbers) != 4
        else:
            numbers = [g for g in match.groups()[2:] if g is not None]
        box = tuple(float(v) for v in numbers[:4])
        found.append(ParsedBox(ref, box, "cut box" if cut else box_problem(box)))
    return found


def box_problem(box: Box) -> str | None:
    """Why a grid box cannot be an answer, or None."""
    x1, y1, x2, y2 = box
    if x2 < x1 or y2 < y1:
        return "inverted box"
    if min(box) < 0 or max(box) >= GRID:
        return "outside the grid"
    return None


def pick_box(parsed: list[ParsedBox], phrase: str | None) -> Box | None:
    """The answer's box for `phrase`: the first usable box labelled with it, else the first usable box.

    The fallback keeps answers whose ref paraphrases the query ("the cat" -> "cat") instead of
    scoring them as misses; an answer with no usable box is a parse failure (None).
    """
    usable = [p for p in parsed if p.problem is None]
    if not usable:
        return None
    wanted = (phrase or "").strip().lower()
    for item in usable:
        if item.ref is not None and item.ref.lower() == wanted:
            return item.box
    return usable[0].box


def failure(parsed: list[ParsedBox]) -> str:
    """Why no usable box was found: `no box`, or the first box's problem."""
    return next((p.problem for p in parsed if p.problem), "no box")


def parse_official(text: str) -> Box | None:
    """First `(a,b),(c,d)` as in the official RefCOCO script; None where it writes (0,0,0,0)."""
    match = _OFFICIAL.search(text)
    if match is None or "," not in match.group(1) or "," not in match.group(2):
        return None
    try:
        x1, y1 = (float(v) for v in match.group(1).split(","))
        x2, y2 = (float(v) for v in match.group(2).split(","))
    except ValueError:  # "1,2,3" or "a,b": the original's bare `except` gives (0,0,0,0)
        return None
    return (x1, y1, x2, y2)
