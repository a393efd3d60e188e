"""The README's walkthrough runs as written (litgpt keeps the same kind of test)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def walkthrough_blocks() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Walkthrough on the tiny model", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)


def test_the_walkthrough_has_commands():
    [block] = walkthrough_blocks()
    assert block.count("workbench ") >= 6


@pytest.mark.slow
def test_readme_walkthrough_runs_as_written(tmp_path):
    """In a folder holding the repository's configs (what a fresh clone has), with the venv's bin on PATH."""
    (tmp_path / "configs").symlink_to(REPO / "configs")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "HF_HUB_OFFLINE": "1"}
    for block in walkthrough_blocks():
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "runs/tiny/lora/adapter_model.safetensors").is_file()
    assert (tmp_path / "runs/tiny/eval/report.json").is_file()
    assert (tmp_path / "runs/tiny/merged/merge_report.json").is_file()
    metrics = (tmp_path / "runs/tiny/lora/metrics.jsonl").read_text()
    assert "eval_grounding_acc@0.5" in metrics
