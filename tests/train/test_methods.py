"""The method registry (issue 32): every refusal runs before the run folder is touched."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from workbench.errors import ConfigError
from workbench.train.config import load_run_config


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    from workbench.demo.synthetic import make_shapes_dataset

    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), 4, shapes_per_image=(1, 1), seed=5)


class Launched:
    """accelerate's PartialState as `accelerate launch --num_processes N` would report it."""

    def __init__(self, processes: int):
        import workbench.train.trainer as trainer

        self.real, self.processes = trainer.PartialState, processes

    def __call__(self, *args, **kwargs):
        state = self.real(*args, **kwargs)
        processes = self.processes

        class State:
            num_processes = processes

            def __getattr__(self, name):
                return getattr(state, name)

        return State()


@pytest.mark.parametrize("method,section,settings,words", [
    ("grpo", {}, {}, "runs in one process"),                                  # the launch
    ("grpo", {"init_from": "no/such/run"}, {}, "grpo.init_from: no/such/run holds no"),
    ("dpo", {"init_from": "no/such/run"}, {}, "dpo.init_from: no/such/run holds no"),
    ("grpo", {}, {"vit_cache": True}, "data.vit_cache: not supported with method: grpo"),
])
def test_a_refused_run_leaves_nothing_behind(tmp_path, tiny_model, shapes, monkeypatch, method, section,
                                             settings, words):
    from tests.train.test_grpo import config_file
    from workbench.train import trainer

    path = config_file(tmp_path, tiny_model, shapes)
    raw = yaml.safe_load(path.read_text())
    raw.pop("grpo")
    raw.update(method=method, **{method: section})
    raw["data"].update(settings)
    path.write_text(yaml.safe_dump(raw))
    if words.endswith("one process"):
        monkeypatch.setattr(trainer, "PartialState", Launched(2))
    with pytest.raises(ConfigError, match=words):
        trainer.train(load_run_config(path))
    assert not (tmp_path / "run").exists()


def test_the_corrected_grpo_command_runs_after_a_refused_launch(tmp_path, tiny_model, shapes, monkeypatch, capsys):
    """Issue 32: `accelerate launch --num_processes 2 ... train configs/demo-grpo.yaml` was refused only
    after config.resolved.yaml and workbench_run.json were written, so the single-process command
    then found "a run" and asked for --resume."""
    from tests.train.test_grpo import config_file
    from workbench.cli.main import main
    from workbench.train import trainer

    path = config_file(tmp_path, tiny_model, shapes, max_steps=1, save_steps=10)
    with monkeypatch.context() as m:
        m.setattr(trainer, "PartialState", Launched(2))
        assert main(["train", str(path)]) == 2
    assert "method: grpo runs in one process" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main(["train", str(path)]) == 0
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


def test_dpo_without_trl_is_refused_before_anything_is_written(tmp_path, tiny_model, shapes, monkeypatch):
    import importlib.util

    from tests.train.test_grpo import config_file
    from workbench.train import trainer

    path = config_file(tmp_path, tiny_model, shapes)
    raw = yaml.safe_load(path.read_text())
    raw.pop("grpo")
    raw.update(method="dpo")
    path.write_text(yaml.safe_dump(raw))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trl" else real(name, *a))
    with pytest.raises(ConfigError, match="method: dpo needs the trl package"):
        trainer.train(load_run_config(path))
    assert not (tmp_path / "run").exists()
