"""A run that cannot work stops before a weight file is opened, with one line, creating nothing."""

from __future__ import annotations

import pytest

from workbench.cli.main import main


@pytest.fixture
def no_weights_read(monkeypatch):
    """Any attempt to read a weight file fails the test."""
    import safetensors
    import torch

    from workbench.model import checkpoint

    def refuse(*args, **kwargs):
        raise AssertionError("a weight file was opened")

    monkeypatch.setattr(checkpoint, "iter_shards", refuse)
    monkeypatch.setattr(checkpoint, "load_weight_file", refuse)
    monkeypatch.setattr(safetensors, "safe_open", refuse)
    monkeypatch.setattr(torch, "load", refuse)


CASES = [
    ("missing data file", ["data.train=nope/train.jsonl"], "nope/train.jsonl: data file not found"),
    ("missing model folder", ["model=./models/typo"], "./models/typo: no such model folder"),
    ("uncached hub id, no network", ["model=Qwen/Qwen-VL-Chat-Int9"], "Qwen/Qwen-VL-Chat-Int9: not in the local hub cache"),
    ("unwritable output folder", ["train.output_dir={tmp}/a-file/run"], "train.output_dir: cannot create or write"),
    ("missing image root", ["data.image_root={tmp}/no-images"], "data.image_root: "),
    ("grounding eval without data", ["train.eval_grounding={{}}"], "train.eval_grounding.data: needed"),
]


@pytest.mark.parametrize("what, overrides, message", CASES, ids=[c[0] for c in CASES])
def test_refused_before_any_weight_is_read(tmp_path, run_config, no_weights_read, capsys, monkeypatch,
                                           what, overrides, message):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", what.startswith("uncached"))
    (tmp_path / "a-file").write_text("not a folder")
    config = run_config(folder=tmp_path / "cfg")
    out = tmp_path / "cfg" / "run"
    sets = [arg for o in overrides for arg in ("--set", o.format(tmp=tmp_path))]
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(config), *sets]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0 and "Traceback" not in err, err
    assert not out.exists(), "nothing is created at the output path"
