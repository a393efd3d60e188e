"""`python -m workbench.bench.int4` end to end on the tiny model (the CPU run of the GPU script's Int4 part)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import TINY_REF
from workbench.bench.int4 import main

pytestmark = pytest.mark.slow


def test_int4_bench_quantizes_scores_and_serves_both_models(tmp_path, calib, capsys):
    out = tmp_path / "bench"
    assert main(["--model", str(TINY_REF), "--data", str(calib), "--eval", str(calib), "--out", str(out),
                 "--samples", "8", "--group-size", "64", "--serve"]) == 0
    result = json.loads((out / "int4_bench.json").read_text())
    assert result["samples"] == 8 and result["quantize_seconds"] > 0 and result["quantize_peak_rss_gb"] > 0
    for name in ("bf16", "int4"):
        row = result[name]
        assert 0 <= row["acc@0.5"] <= 1
        assert row["generate_tokens_per_s"] > 0 and row["serve_tokens_per_s"] > 0
    assert result["int4"]["weights_gb"] < result["bf16"]["weights_gb"]
    printed = capsys.readouterr().out
    assert "| int4 |" in printed and "| bf16 |" in printed
