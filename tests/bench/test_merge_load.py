"""The merge-against-copy round of `workbench bench --merge-load` on the tiny model (the full-size
run is in BENCHMARKS.md): every merge it times is checked by hand, and the ratios are its own numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from workbench.bench import merge_load as ml

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_a_round_times_and_checks_every_merge(tmp_path):
    from workbench.demo.tiny import make_tiny_model_dir

    base = make_tiny_model_dir(tmp_path / "base")
    adapter = ml.write_adapter(tmp_path / "adapter", shapes=ml.model_shapes(base))
    # `before` is this tree itself: the phase runs it from a source folder, as with an older checkout
    result = ml.merge_round(tmp_path, base, adapter, before=REPO, keep=False)
    assert set(result) == {"load_average", "copy_s", *ml.MERGES}
    for phase in ml.MERGES:
        m = result[phase]
        assert m["probe_equal"] and m["untouched_bit_equal"], (phase, m)
        assert m["over_copy"] == pytest.approx(m["s"] / result["copy_s"])
        assert m["cpu"]["user_s"] > 0 and m["rss"] > 0
    assert not (tmp_path / "merged").exists()
    summary = ml.format_results({"files": 1, "weight_bytes": 1, "largest_shard_bytes": 1, "rounds": [result],
                                 "medians": {"merge_over_copy": result["merge"]["over_copy"]}, "read_s": 1.0,
                                 "load_s": 1.0, "load_over_read": 1.0, "load_rss": 1, "load_rss_over_weights": 1.0,
                                 "import_s": 1.0, "import_rss": 1})
    assert f"{result['merge']['over_copy']:.2f}x copy" in summary
