"""`workbench demo` end to end with a short run: every artefact exists and is valid.

Learning is not checked here (test_grounding_learns.py does that); 8 steps keep it fast.
"""

from __future__ import annotations

import json

import pytest
from PIL import Image

from workbench.cli.main import main

pytestmark = pytest.mark.slow


def _png_ok(path) -> bool:
    with Image.open(path) as image:
        image.verify()
        return image.format == "PNG"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("demo") / "report"
    return out, main(["demo", "--out", str(out), "--steps", "8", "--seed", "3", "--grpo", "--grpo-steps", "2"])


def test_demo_writes_a_valid_report_folder(demo_run, capsys) -> None:
    from workbench import load_model

    out, code = demo_run
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 8 and metrics["seed"] == 3 and metrics["after_grpo"]["steps"] == 2
    from workbench.demo.runner import summary

    assert "after SFT" in summary(metrics, out) and "after GRPO" in summary(metrics, out)
    assert _png_ok(out / "grpo" / "loss_curve.png")
    for when in ("before", "after", "after_grpo"):
        assert metrics[when]["n"] > 0 and 0 <= metrics[when]["acc@0.5"] <= 1
        report = json.loads((out / f"eval_{when}" / "report.json").read_text())
        assert len(report["samples"]) == metrics[when]["n"]
        pngs = sorted((out / f"eval_{when}" / "samples").glob("*.png"))
        assert pngs and all(_png_ok(p) for p in pngs)
    assert _png_ok(out / "adapter" / "loss_curve.png")
    assert _png_ok(out / "answer.png")
    assert metrics["example"]["question"].startswith("Output the bounding box of <ref>")

    assert metrics["merge_verify"]["passed"] is True
    merge_report = json.loads((out / "merged" / "merge_report.json").read_text())
    assert merge_report["verify"]["passed"] is True and merge_report["merged_modules"]
    merged = load_model(out / "merged")
    assert merged.config.visual["image_size"] == 224


def test_demo_refuses_a_folder_with_files(demo_run, capsys) -> None:
    out, _ = demo_run
    capsys.readouterr()
    assert main(["demo", "--out", str(out), "--steps", "1"]) == 2
    assert f"{out}: the demo's report folder exists" in capsys.readouterr().err
