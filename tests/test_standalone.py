"""The workbench stands alone: a plain clone tests itself, and a wheel installed anywhere finds its
built-in recipes, templates and configs.

Both tests install into a fresh virtualenv that sees this test environment's packages through a
.pth line (torch and the rest are not installed twice, and nothing is downloaded) but not its
editable install of the workbench: .pth files inside a folder added that way are not processed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done


def _clone(into: Path) -> Path:
    """A plain `git clone` of this repository's HEAD, alone in an otherwise empty folder."""
    into.mkdir()
    _run(["git", "clone", "--quiet", REPO, into / "workbench"], into)
    assert [p.name for p in into.iterdir()] == ["workbench"]
    return into / "workbench"


def _venv(where: Path) -> Path:
    """A new virtualenv that sees the test environment's packages; returns its python."""
    _run([sys.executable, "-m", "venv", "--without-pip", where], where.parent)
    site = next(where.glob("lib/python*/site-packages"))
    (site / "test-environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return where / "bin" / "python"


def _pip(python: Path, *args: object) -> None:
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps",
          "--no-build-isolation", "--no-index", *args], python.parent)


@pytest.mark.slow
def test_a_plain_clone_runs_its_fast_suite(tmp_path):
    clone = _clone(tmp_path / "empty")
    python = _venv(tmp_path / "venv")
    _pip(python, "-e", clone)
    where = _run([python, "-c", "from workbench.builtin import builtin_dir as b; import workbench; "
                                "print(workbench.__file__, b('recipes').resolve())"], tmp_path).stdout.split()
    assert all(Path(p).is_relative_to(clone) for p in where), where  # the clone's code, not this checkout's
    done = _run([python, "-m", "pytest", "-q", "-m", "not slow", "-n", "2", "-p", "no:cacheprovider"], clone,
                timeout=1500)
    assert " passed" in done.stdout and " failed" not in done.stdout and " error" not in done.stdout, done.stdout[-2000:]


@pytest.mark.slow
def test_the_wheel_finds_its_recipes_templates_and_configs(tmp_path):
    source = _clone(tmp_path / "src")
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", tmp_path / "dist", source], tmp_path)
    [wheel] = (tmp_path / "dist").glob("workbench-*.whl")
    python = _venv(tmp_path / "venv")
    _pip(python, wheel)
    workbench = python.parent / "workbench"
    user = tmp_path / "user"  # an empty folder with the user's own files only
    user.mkdir()

    # A copy of an example config naming a built-in recipe and template (the release's config ships too).
    shutil.copy(REPO / "configs" / "official-lora.yaml", user / "official-lora.yaml")
    out = _run([workbench, "inspect", "official-lora.yaml"], user).stdout
    assert "official-lora" in out and "112,197,632" in out, out  # the recipe's LoRA parameters on the release

    # A file in the official format (finetune.py's JSON list), checked with the tiny reference tokenizer.
    golden = json.loads((REPO / "tests" / "reference" / "tiny-qwen-vl-chat" / "golden.json").read_text())
    rows = [{"id": str(i), "conversations": s["conversations"]} for i, s in enumerate(golden["case8"]["sources"][:2])]
    shutil.copytree(REPO / "tests" / "reference" / "tiny-qwen-vl-chat" / "images", user / "images")
    (user / "train.json").write_text(json.dumps(rows))
    out = _run([workbench, "data", "check", "train.json", "--model", REPO / "tests" / "reference" / "tiny-qwen-vl-chat"],
               user).stdout
    assert "train.json: 2 records, 2 valid, 0 bad" in out, out

    out = _run([workbench, "demo", "--steps", "2", "--out", "demo"], user, timeout=600).stdout
    metrics = json.loads((user / "demo" / "metrics.json").read_text())
    assert metrics["steps"] == 2 and (user / "demo" / "merged" / "config.json").is_file(), out
    where = _run([python, "-c", "from workbench.builtin import builtin_dir; print(builtin_dir('templates'))"],
                 user).stdout.strip()
    assert Path(where).is_relative_to(python.parent.parent), where  # the wheel's copy, inside the venv
