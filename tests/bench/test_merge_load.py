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
    # a `before` tree is this tree itself: the phase runs it from a source folder, as with an older checkout
    trees = {"earlier": REPO, ml.CURRENT: None}
    result = ml.merge_round(tmp_path, base, adapter, trees, keep=False)
    assert set(result) == {"load_average", "copy_s", "merges"}
    assert list(result["merges"]) == list(trees)
    for label, phases in result["merges"].items():
        assert list(phases) == list(ml.PHASES)
        for phase, m in phases.items():
            assert m["probe_equal"] and m["untouched_bit_equal"], (label, phase, m)
            assert m["over_copy"] == pytest.approx(m["s"] / result["copy_s"])
            assert m["cpu"]["user_s"] > 0 and m["rss"] > 0
    assert not (tmp_path / "merged").exists()
    medians = {label: {phase: m["over_copy"] for phase, m in phases.items()} for label, phases in result["merges"].items()}
    summary = ml.format_results({"files": 1, "weight_bytes": 1, "largest_shard_bytes": 1, "rounds": [result],
                                 "medians": medians, "read_s": 1.0, "load_s": 1.0, "load_over_read": 1.0,
                                 "load_rss": 1, "load_rss_over_weights": 1.0, "import_s": 1.0, "import_rss": 1})
    remembered = result["merges"][ml.CURRENT]["remembered"]["over_copy"]
    assert f"current remembered {remembered:.2f}x" in summary
    line = next(x for x in summary.splitlines() if x.lstrip().startswith("earlier, never hashed"))
    assert f"{result['merges']['earlier']['never_hashed']['s']:.1f} s = " in line


@pytest.mark.parametrize("before", ["nolabel", "=" + str(REPO), f"current={REPO}", "x=/nonexistent"])
def test_before_must_name_a_label_and_a_source_tree(before, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ml.main(["/unused", "--before", before])
    assert exit_info.value.code == 2
    assert f"--before {before}: expected LABEL=SRC" in capsys.readouterr().err
