"""The two-domain experiment's data split (workbench/demo/merge_domains.py)."""

from __future__ import annotations

import json

import pytest

from workbench.demo.merge_domains import DOMAINS, domain_of, split_by_domain
from workbench.demo.synthetic import COLOURS


@pytest.mark.parametrize("phrase, domain", [
    ("the red square", "warm"), ("the yellow triangle", "warm"),
    ("the green circle", "cool"), ("the blue square", "cool"),
])
def test_domain_of_a_phrase(phrase, domain):
    assert domain_of(phrase) == domain


def test_domains_cover_every_colour_once():
    colours = [c for cs in DOMAINS.values() for c in cs]
    assert sorted(colours) == sorted(COLOURS)


def test_split_keeps_every_record_in_its_domain(tmp_path):
    from workbench.demo.synthetic import make_shapes_dataset

    data = make_shapes_dataset(tmp_path, 12, shapes_per_image=(1, 3), seed=3)
    records = data.read_text().splitlines()
    files = split_by_domain(data)
    parts = {name: [json.loads(line) for line in path.read_text().splitlines()] for name, path in files.items()}
    assert sum(len(p) for p in parts.values()) == len(records)
    for name, part in parts.items():
        assert part and all(domain_of(r["objects"][0]["ref"]) == name for r in part)
        assert all((tmp_path / r["images"][0]).is_file() for r in part)  # image paths still resolve
