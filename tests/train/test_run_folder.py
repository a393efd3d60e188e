"""Run folder checks, metrics file, loss plot, run guard and the CLI's error path (no training)."""

from __future__ import annotations

import json
import math
import shutil
import signal
from collections import namedtuple

import pytest
import torch
from transformers import TrainerControl, TrainerState, TrainingArguments

from workbench.cli.main import main
from workbench.errors import WorkbenchError
from workbench.train import record
from workbench.train.callbacks import MetricsLogger, RunGuard, read_metrics
from workbench.train.plots import plot_loss_curve


def make_checkpoint(folder, step, complete=True):
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if complete:
        (path / "trainer_state.json").write_text("{}")
    return path


def test_unwritable_output_dir_fails_before_training(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(WorkbenchError, match="train.output_dir: cannot create or write .*file/run"):
        record.check_output_dir(tmp_path / "file" / "run", resume=False)
    assert not (tmp_path / "file").is_dir()


def test_existing_run_needs_resume_and_resume_needs_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert record.check_output_dir(out, resume=False) is None
    assert not out.exists()  # the check creates nothing
    with pytest.raises(WorkbenchError, match="--resume: no complete checkpoint-N folder"):
        record.check_output_dir(out, resume=True)
    make_checkpoint(out, 5)
    make_checkpoint(out, 10)
    make_checkpoint(out, 15, complete=False)  # a save cut short is not resumed from
    with pytest.raises(WorkbenchError, match="already holds a run; add --resume"):
        record.check_output_dir(out, resume=False)
    assert record.check_output_dir(out, resume=True) == out / "checkpoint-10"


def test_low_disk_space_is_reported(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 2**20, 2**20))
    with pytest.raises(WorkbenchError, match=r"only 0.00 GiB free .* need about 0.13 GiB \(lower train.save_total_limit"):
        record.check_disk_space(tmp_path, trainable_params=10**6, kept_checkpoints=3)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 0, 10**12))
    record.check_disk_space(tmp_path, trainable_params=10**6, kept_checkpoints=3)


def test_metrics_are_appended_and_cut_back_to_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    args, control = TrainingArguments(output_dir=str(tmp_path), report_to="none"), TrainerControl()
    logger = MetricsLogger(path)
    state = TrainerState()
    for step in (1, 2, 3, 4):
        state.global_step = step
        logger.on_log(args, state, control, logs={"loss": 5.0 - step})
    assert [m["step"] for m in read_metrics(path)] == [1, 2, 3, 4]
    state.global_step = 2  # resumed from checkpoint-2: steps 3 and 4 will be redone
    logger.on_train_begin(args, state, control)
    assert [(m["step"], m["loss"]) for m in read_metrics(path)] == [(1, 4.0), (2, 3.0)]


def test_loss_curve_png(tmp_path):
    metrics = [{"step": s, "loss": 3.0 / s, "learning_rate": 1e-3} for s in range(1, 6)]
    metrics += [{"step": 5, "eval_loss": 0.9}, {"step": 6, "loss": math.nan}]
    assert plot_loss_curve(metrics, tmp_path / "loss.png", title="t")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plot_loss_curve([{"step": 1, "train_runtime": 1.0}], tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
    # With grounding evaluations the figure gains an Acc@0.5 panel below the loss (a taller image).
    grounding = [{"step": s, "eval_grounding_acc@0.5": s / 10, "eval_grounding_mean_iou": s / 20} for s in (2, 4)]
    assert plot_loss_curve(metrics + grounding, tmp_path / "acc.png")
    from PIL import Image

    assert Image.open(tmp_path / "acc.png").height > Image.open(tmp_path / "loss.png").height


@pytest.fixture
def step_end():
    args, state = TrainingArguments(output_dir="unused", report_to="none"), TrainerState(global_step=7)

    def run(guard: RunGuard) -> TrainerControl:
        control = TrainerControl(should_save=True, should_evaluate=True)
        return guard.on_step_end(args, state, control)
    return run


def test_guard_nan_stops_without_saving(step_end):
    guard = RunGuard()
    guard.observe_loss(torch.tensor(1.0))
    control = step_end(guard)
    assert not control.should_training_stop and control.should_save and guard.reason is None
    guard.observe_loss(torch.tensor(2.0))
    guard.observe_loss(torch.tensor(float("inf")))  # one bad micro-batch spoils the step
    guard.observe_loss(torch.tensor(3.0))
    control = step_end(guard)
    assert control.should_training_stop and not control.should_save and not control.should_evaluate
    assert guard.reason == "non_finite_loss" and guard.bad_step == 7


def test_guard_signals_save_then_stop_and_second_ctrl_c_aborts(step_end):
    guard = RunGuard()
    before = signal.getsignal(signal.SIGINT)
    with guard.catch_signals():
        signal.raise_signal(signal.SIGTERM)
        assert guard.stop_requested
        control = step_end(guard)
        assert control.should_training_stop and control.should_save and guard.reason == "interrupted"
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_cli_reports_config_errors_without_a_traceback(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps({"model": "m", "adapter": "official-lora", "data": {"train": "t.jsonl"},
                                "train": {"output_dir": str(tmp_path / "out"), "lr": 1e-4}}))
    assert main(["train", str(path), "--set", "train.warmup_ratoi=0.1"]) == 2
    err = capsys.readouterr().err
    assert "train.warmup_ratoi: unknown key; did you mean 'warmup_ratio'?" in err
    assert "Traceback" not in err
