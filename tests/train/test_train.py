"""End-to-end training on the tiny model (CPU, float32): learning, saving, reloading, stopping, resuming."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from workbench.errors import WorkbenchError
from workbench.train.callbacks import read_metrics
from workbench.train.config import load_run_config
from workbench.train.trainer import train

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run_dir / "metrics.jsonl") if "loss" in m}


class Hook(TrainerCallback):
    """Runs `fn(step, model)` at the start of one optimizer step."""

    def __init__(self, step: int, fn):
        self.step, self.fn = step, fn

    def on_step_begin(self, args, state, control, model=None, **kw):
        if state.global_step + 1 == self.step:
            self.fn(model)


@pytest.mark.parametrize("recipe", ["lora", "qlora", "all3"])
def test_tiny_model_learns_and_run_folder_is_complete(run_config, toy_data, recipe):
    config = load_run_config(run_config(recipe, eval_data=True))
    vit_outputs = []
    hook = Hook(1, lambda model: model.get_base_model().transformer.visual.register_forward_hook(
        lambda mod, args, out: vit_outputs.append(out.requires_grad) if mod.training else None))
    result = train(config, callbacks=[hook])

    assert result.status == "completed" and result.global_step == 30
    by_step = losses(result.output_dir)
    assert by_step[30] < by_step[1] / 2, by_step
    # A frozen ViT builds no autograd graph; an adapted one does.
    assert vit_outputs and set(vit_outputs) == {recipe == "all3"}

    out = result.output_dir
    for name in ("adapter_config.json", "adapter_model.safetensors", "config.resolved.yaml", "metrics.jsonl",
                 "loss_curve.png", "checkpoint-30"):
        assert (out / name).exists(), name
    run = json.loads((out / "workbench_run.json").read_text())
    assert run["status"] == "completed" and run["result"]["global_step"] == 30
    assert run["base_model"]["fingerprint"]["weights"]["model.safetensors"]
    assert set(run["data"]) == {str(toy_data / "train.jsonl"), str(toy_data / "eval.jsonl")}
    assert run["result"]["last_eval_loss"] < run["result"]["first_loss"]
    # The resolved config is itself a valid run config with the same content.
    assert load_run_config(out / "config.resolved.yaml").to_dict() == config.to_dict()


def test_saved_adapter_reloads_with_peft_and_gives_the_trained_logits(run_config, tiny_model):
    from peft import PeftModel

    from workbench.api import load_model, load_tokenizer
    from workbench.data.collator import SFTCollator
    from workbench.data.dataset import load_sft_data

    # Gradient checkpointing (non-reentrant) on, as in the real configs.
    config = load_run_config(run_config("all3", max_steps=10, gradient_checkpointing=True))
    result = train(config)
    tokenizer = load_tokenizer(tiny_model)
    data = load_sft_data(config.data, tokenizer, image_size=56)
    batch = SFTCollator(tokenizer.pad_token_id)([data.train[i] for i in range(4)])  # item 0 has an image
    assert "pixel_values" in batch
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    with torch.no_grad():
        trained = result.model.eval()(**inputs).logits
        reloaded = PeftModel.from_pretrained(load_model(tiny_model, dtype="float32"), result.output_dir).eval()
        again = reloaded(**inputs).logits
        base = load_model(tiny_model, dtype="float32")(**inputs).logits
    assert (trained - base).abs().max() > 1e-2  # training changed the model
    torch.testing.assert_close(again, trained, atol=1e-5, rtol=0)


def test_interrupt_saves_a_checkpoint_and_resume_matches_the_straight_run(tmp_path, run_config):
    # Cosine schedule with warmup, accumulation, LoRA dropout (RNG) and a parameter trained in
    # place: everything the checkpoint must carry for the resumed run to match bit for bit.
    settings = dict(max_steps=8, save_steps=100, schedule="cosine", warmup_steps=2, batch_size=2,
                    gradient_accumulation_steps=2, weight_decay=0.1)
    straight = train(load_run_config(run_config("all3", folder=tmp_path / "a", **settings)))

    path = run_config("all3", folder=tmp_path / "b", **settings)
    ctrl_c = Hook(4, lambda model: signal.raise_signal(signal.SIGINT))  # the real handler runs
    stopped = train(load_run_config(path), callbacks=[ctrl_c])
    assert stopped.status == "interrupted" and stopped.global_step == 4
    assert (stopped.output_dir / "checkpoint-4").is_dir()
    assert not (stopped.output_dir / "adapter_model.safetensors").exists()  # not finished: no final adapter
    assert json.loads((stopped.output_dir / "workbench_run.json").read_text())["status"] == "interrupted"

    # A key that reshapes the schedule is refused on resume, before anything is loaded or written.
    with pytest.raises(WorkbenchError, match=r"train.max_steps: 8 -> 12.*allow_schedule_change_on_resume"):
        train(load_run_config(path, ["train.max_steps=12"]), resume=True)
    resumed = train(load_run_config(path), resume=True)
    assert resumed.status == "completed" and resumed.global_step == 8
    run = json.loads((resumed.output_dir / "workbench_run.json").read_text())
    assert [s["resumed_from"] for s in run["sessions"]] == [None, "checkpoint-4"]

    a, b = losses(straight.output_dir), losses(resumed.output_dir)
    assert sorted(b) == list(range(1, 9))
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-6), step
    wa = load_file(straight.output_dir / "adapter_model.safetensors")
    wb = load_file(resumed.output_dir / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and any("attn_pool.query" in k for k in wa)
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], atol=1e-6, rtol=0, msg=key)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(run_config, capsys):
    config = load_run_config(run_config("lora", max_steps=10, save_steps=2))

    def poison(model):
        next(p for n, p in model.named_parameters() if "lora_B" in n).data.fill_(float("nan"))

    result = train(config, callbacks=[Hook(5, poison)])
    assert result.status == "non_finite_loss" and result.bad_step == 5
    out = result.output_dir
    assert [p.name for p in sorted(out.glob("checkpoint-*"))] == ["checkpoint-2", "checkpoint-4"]
    assert not (out / "adapter_model.safetensors").exists()
    assert math.isnan(losses(out)[5])
    run = json.loads((out / "workbench_run.json").read_text())
    assert run["status"] == "non_finite_loss"
    assert run["result"]["last_checkpoint"].endswith("checkpoint-4")
    printed = capsys.readouterr().out
    assert "NaN/inf at step 5" in printed and "checkpoint-4" in printed


def _launch(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_two_cpu_processes_match_one_process_with_the_same_global_batch(tmp_path, run_config):
    single = run_config("lora", folder=tmp_path / "one", max_steps=2, batch_size=4)
    double = run_config("lora", folder=tmp_path / "two", max_steps=2, batch_size=2)
    bin_dir = Path(sys.executable).parent
    one = _launch([sys.executable, "-m", "workbench.cli.main", "train", str(single)], REPO)
    two = _launch([str(bin_dir / "accelerate"), "launch", "--config_file", "configs/accelerate/ddp.yaml",
                   "--num_processes", "2", "--main_process_port", "29517",
                   "-m", "workbench.cli.main", "train", str(double)], REPO)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("completed: step 2") == 1  # one summary: only rank 0 reports
    first, second = losses(tmp_path / "one" / "run"), losses(tmp_path / "two" / "run")
    assert abs(first[1] - second[1]) < 1e-5, (first, second)


def test_cli_trains_the_shipped_tiny_config(tmp_path, tiny_ref_dir, monkeypatch, capsys):
    from workbench.cli.main import main
    from workbench.demo.synthetic import make_shapes_dataset

    data = make_shapes_dataset(tmp_path / "shapes", 12, size_range=(56, 80))
    monkeypatch.chdir(REPO)  # the config's paths are relative to the repository
    code = main(["train", "configs/tiny-lora.yaml", "--set", f"model={tiny_ref_dir}", "--set", f"data.train={data}",
                 "--set", f"train.output_dir={tmp_path / 'run'}", "--set", "train.max_steps=6",
                 "--set", "train.save_steps=3", "--set", "train.eval_steps=3"])
    assert code == 0
    out = tmp_path / "run"
    assert "completed: step 6" in capsys.readouterr().out
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert {"eval_loss", "loss"} <= {k for m in read_metrics(out / "metrics.jsonl") for k in m}
    steps = losses(out)
    assert steps[6] < steps[1]


class NotATensor:  # a class the weights-only unpickler refuses
    pass


def test_a_refused_checkpoint_file_is_named_on_resume(tmp_path, run_config, capsys):
    from workbench.cli.main import main

    path = run_config(max_steps=2, save_steps=2)
    assert main(["train", str(path)]) == 0
    rng = tmp_path / "run" / "checkpoint-2" / "rng_state.pth"
    torch.save({"python": NotATensor()}, rng)
    assert main(["train", str(path), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: --resume: {rng}: refused"), err
