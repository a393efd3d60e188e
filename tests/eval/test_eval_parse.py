"""Box parsing from model answers: tagged, untagged, malformed, several refs, garbage."""

from __future__ import annotations

import pytest

from workbench.eval.parse import ParsedBox, failure, parse_boxes, parse_official, pick_box


@pytest.mark.parametrize("text, expected", [
    ("<ref>the cat</ref><box>(12,34),(560,780)</box>", [("the cat", (12, 34, 560, 780))]),
    ("the cat(12,34),(560,780)", [(None, (12, 34, 560, 780))]),  # decoded with special tokens skipped
    ("<ref>dogs</ref><box>(1,2),(3,4)</box><box>(5,6),(7,8)</box> and <ref>cat</ref><box>(9,10),(11,12)</box>",
     [("dogs", (1, 2, 3, 4)), ("dogs", (5, 6, 7, 8)), ("cat", (9, 10, 11, 12))]),
    ("<box>12,34),(560,780</box>", [(None, (12, 34, 560, 780))]),      # brackets lost inside the tags
    ("<ref>cat</ref><box>(12,34),(560,780)", [("cat", (12, 34, 560, 780), "cut box")]),  # stopped before </box>
    ("<ref>green rectangle</ref><box>(7,6,6,(7,(7,(7,", [("green rectangle", (7, 6, 6, 7), "cut box")]),
    ("<ref>cat</ref><box>(560,34),(12,780)</box>", [("cat", (560, 34, 12, 780), "inverted box")]),
    ("<ref>cat</ref><box>(12,34),(560,1000)</box>", [("cat", (12, 34, 560, 1000), "outside the grid")]),
    ("(12,34),(560,780", [(None, (12, 34, 560, 780))]),                # no tags, last bracket missing
    ("12, 34), (560, 780)", [(None, (12, 34, 560, 780))]),             # first bracket missing, spaces
    ("<ref>cat<box>(1,2),(3,4)</box>", [("cat", (1, 2, 3, 4))]),        # unclosed <ref>
    ("[12, 34, 560, 780]", [(None, (12, 34, 560, 780))]),
    ("(1.5,2),(3,4.25)", [(None, (1.5, 2, 3, 4.25))]),
    ("<box>(12,34),(560</box><ref>x</ref><box>(1,2),(3,4)</box>", [("x", (1, 2, 3, 4))]),  # 3 numbers: no box
    ("<box>abc</box>", []),
    ("I cannot see that, 3 cats", []),
    ("", []),
])
def test_parse_boxes(text, expected):
    assert parse_boxes(text) == [ParsedBox(*item) for item in expected]


def test_pick_box_prefers_the_query_ref_then_the_first_box():
    parsed = [ParsedBox("dog", (1, 1, 2, 2)), ParsedBox("cat", (3, 3, 4, 4))]
    assert pick_box(parsed, " Cat ") == (3, 3, 4, 4)
    assert pick_box(parsed, "bird") == (1, 1, 2, 2)  # a box for another ref still answers the query
    assert pick_box([], "cat") is None
    cut = parse_boxes("<ref>cat</ref><box>(12,34),(56,78")
    assert pick_box(cut, "cat") is None and failure(cut) == "cut box" and failure([]) == "no box"


@pytest.mark.parametrize("text, expected", [
    ("(12,34),(560,780)", (12, 34, 560, 780)),
    ("a dog(12,34),(560,780)(1,2),(3,4)", (12, 34, 560, 780)),  # first match only
    ("<ref>a</ref><box>( 1, 2),(3 ,4)</box>", (1, 2, 3, 4)),    # float() accepts the spaces
    ("(1,2,3),(4,5)", None),   # three numbers: the original's except -> (0,0,0,0)
    ("(1 2),(3,4)", None),     # no comma in a group
    ("(a,b),(c,d)", None),
    ("12,34,560,780", None),   # the official regex needs the brackets
])
def test_parse_official(text, expected):
    assert parse_official(text) == expected
