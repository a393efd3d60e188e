"""configs/accelerate/fsdp.yaml on 2 CPU processes (gloo): same losses and adapter as 1 process, resume, merge.

Two launches serve every end-to-end test here (module-scoped; a launch costs about half a minute
of imports on two cores): fsdp_worker.py trains the LoRA run, the all-components run and a copy of
it interrupted after step 3; `workbench train --resume` then finishes the interrupted one. The
single-process references use the same micro-batches (2 records, accumulated twice), so the
comparison isolates the sharding: FSDP all-gathers, reduce-scatters and keeps a shard of the
optimizer state, where one process has it all. (Against 1 x 4 records the ViT weights move by
up to 5e-6 after 5 steps, with DDP too: padding a micro-batch to another length changes float
rounding, and AdamW scales small gradient differences up.)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.train.conftest import write_run_config
from workbench.errors import ConfigError
from workbench.train.callbacks import read_metrics
from workbench.train.config import load_run_config

REPO = Path(__file__).resolve().parents[2]
RECIPES = ["lora", "all3"]
# Cosine with warmup and weight decay: the scheduler and optimizer state must survive the resume.
SETTINGS = dict(max_steps=5, save_steps=100, schedule="cosine", warmup_steps=2, weight_decay=0.1)
STOP = 3


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run_dir / "metrics.jsonl") if "loss" in m}


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter_model.safetensors")


def assert_same_run(one: Path, two: Path, loss_atol: float, weight_atol: float) -> None:
    """Runs `one` and `two` logged the same 5 losses and saved the same adapter, within the tolerances."""
    a, b = losses(one), losses(two)
    assert sorted(b) == [1, 2, 3, 4, 5]
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=loss_atol), step
    wa, wb = adapter(one), adapter(two)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], atol=weight_atol, rtol=0, msg=key)


def launch(args: list[str], config: str = "fsdp") -> subprocess.CompletedProcess:
    """`accelerate launch` of configs/accelerate/<config>.yaml on 2 CPU processes (CUDA hidden, also on a GPU machine)."""
    with socket.socket() as s:  # a free port, so parallel test workers do not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", f"configs/accelerate/{config}.yaml",
           "--num_processes", "2", "--main_process_port", str(port), *args]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def make_config(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, toy_data: Path):
    """make_config(name, recipe, **train) -> the run config of the run folder <name>/run."""
    root = tmp_path_factory.mktemp("fsdp")

    def make(name: str, recipe: str, **train: object) -> Path:
        return write_run_config(root / name, tiny_model, toy_data, recipe, eval_data=False, **SETTINGS, **train)
    return make


@pytest.fixture(scope="module")
def single(make_config) -> dict[str, Path]:
    """The 1-process reference run folder per recipe: 2 records per micro-batch, accumulated twice."""
    from workbench.train import trainer

    paths = {recipe: make_config(f"single-{recipe}", recipe, batch_size=2, gradient_accumulation_steps=2)
             for recipe in RECIPES}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "_cpu_only", lambda: True)  # on CPU as the launched processes, where a GPU is present
        for path in paths.values():
            trainer.train(load_run_config(path))
    return {recipe: path.parent / "run" for recipe, path in paths.items()}


@pytest.fixture(scope="module")
def runs(make_config, single) -> dict[str, Path]:
    """Run folders: single-<recipe> (1 process), fsdp-<recipe> (2 processes), resumed (all3, stopped + resumed)."""
    fsdp = {recipe: make_config(f"fsdp-{recipe}", recipe, batch_size=2) for recipe in RECIPES}
    resumed = make_config("resumed", "all3", batch_size=2)
    worker = launch(["tests/train/fsdp_worker.py", str(fsdp["lora"]), str(fsdp["all3"]), f"{resumed}@{STOP}"])
    assert f"{resumed}: interrupted at step {STOP}" in worker.stdout
    stopped_dir = resumed.parent / "run"
    stopped = json.loads((stopped_dir / "workbench_run.json").read_text())
    assert stopped["status"] == "interrupted" and stopped["result"]["global_step"] == STOP
    assert sorted(p.name for p in stopped_dir.glob("checkpoint-*")) == [f"checkpoint-{STOP}"]
    assert not (stopped_dir / "adapter_model.safetensors").exists()
    resume = launch(["-m", "workbench.cli.main", "train", "--resume", str(resumed)])
    assert resume.stdout.count("completed: step 5") == 1  # only rank 0 reports
    folders = {f"fsdp-{recipe}": path.parent / "run" for recipe, path in fsdp.items()}
    return {**{f"single-{r}": path for r, path in single.items()}, **folders, "resumed": stopped_dir}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_fsdp_on_two_processes_matches_one_process(runs, recipe):
    one, two = runs[f"single-{recipe}"], runs[f"fsdp-{recipe}"]
    a = losses(one)
    assert sorted(a) == [1, 2, 3, 4, 5] and a[5] < a[1]
    assert_same_run(one, two, loss_atol=1e-5, weight_atol=1e-6)
    wa = adapter(one)
    assert len(wa) > 0
    assert any("attn_pool.query" in k for k in wa) == (recipe == "all3")  # the tensor trained in place
    ca, cb = (json.loads((run / "adapter_config.json").read_text()) for run in (one, two))
    assert set(cb.pop("target_modules")) == set(ca.pop("target_modules")) and cb == ca  # PEFT writes a set

    session = json.loads((two / "workbench_run.json").read_text())["sessions"][-1]["distributed"]
    assert session["type"] == "FSDP" and session["world_size"] == 2 and session["num_machines"] == 1
    assert session["backend"] == "gloo"
    assert session["fsdp"] == {"version": 2, "state_dict_type": "FULL_STATE_DICT", "reshard_after_forward": True,
                               "activation_checkpointing": True, "wrap": ["QWenBlock", "VisualAttentionBlock"]}
    single = json.loads((one / "workbench_run.json").read_text())["sessions"][-1]["distributed"]
    assert single["type"] == "NO" and single["world_size"] == 1 and "fsdp" not in single


@pytest.mark.slow
def test_fsdp_run_interrupted_and_resumed_matches_the_uninterrupted_run(runs):
    straight, resumed = runs["fsdp-all3"], runs["resumed"]
    checkpoint = resumed / f"checkpoint-{STOP}"
    assert (checkpoint / "pytorch_model_fsdp.bin").is_file() and (checkpoint / "optimizer.bin").is_file()
    run = json.loads((resumed / "workbench_run.json").read_text())
    assert run["status"] == "completed"
    assert [s["resumed_from"] for s in run["sessions"]] == [None, f"checkpoint-{STOP}"]
    assert [s["distributed"]["type"] for s in run["sessions"]] == ["FSDP", "FSDP"]

    assert_same_run(straight, resumed, loss_atol=1e-6, weight_atol=1e-6)


@pytest.mark.slow
def test_fsdp_adapter_merges_with_verify_and_loads_with_peft(runs, tiny_model, tmp_path, capsys):
    from peft import PeftModel

    from workbench.api import load_model
    from workbench.cli.main import main
    from workbench.merge.verify import probe_batch
    from workbench.model.config import load_config

    fsdp, single = runs["fsdp-all3"], runs["single-all3"]
    assert main(["merge", "--base", str(tiny_model), "--adapter", str(fsdp), "--out", str(tmp_path / "merged"),
                 "--verify"]) == 0
    assert "verify: max |logit diff|" in capsys.readouterr().out

    batch = probe_batch(tiny_model, load_config(tiny_model).visual["image_size"])  # has an image

    @torch.no_grad()
    def logits(adapter_dir: Path | None) -> torch.Tensor:
        model = load_model(tiny_model, dtype="float32")
        if adapter_dir is not None:
            model = PeftModel.from_pretrained(model, adapter_dir)
        return model.eval()(**batch).logits

    under_fsdp = logits(fsdp)
    assert (under_fsdp - logits(None)).abs().max() > 1e-2  # the adapter changes the model
    torch.testing.assert_close(under_fsdp, logits(single), atol=1e-4, rtol=0)


def test_fsdp_activation_checkpointing_and_gradient_checkpointing_are_refused_together(run_config, monkeypatch):
    from workbench.train.distributed import check_launch

    config = load_run_config(run_config("lora", gradient_checkpointing=True))
    check_launch(config)  # no FSDP launch: fine
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    with pytest.raises(ConfigError, match=r"run\.yaml: train\.gradient_checkpointing: .*fsdp_activation_checkpointing"):
        check_launch(config)
    check_launch(load_run_config(run_config("lora", gradient_checkpointing=False)))


def test_without_checkpoint_wrappers_gives_the_names_of_the_gathered_state_dict():
    from torch import nn
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from workbench.train.distributed import without_checkpoint_wrappers

    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)))
    plain = [name for name, _ in model.named_parameters()]
    model[1] = checkpoint_wrapper(model[1])
    wrapped = [name for name, _ in model.named_parameters()]
    assert wrapped != plain and "1._checkpoint_wrapped_module.0.weight" in wrapped
    with without_checkpoint_wrappers(model):
        assert [name for name, _ in model.named_parameters()] == plain
    assert [name for name, _ in model.named_parameters()] == wrapped  # put back for training


@pytest.mark.parametrize("sharded", [False, True])
def test_a_sharded_frozen_vit_runs_on_text_only_batches(tiny_model, sharded):
    # Under FSDP / ZeRO-3 every rank must run the ViT's gathers in every step, image or not.
    from workbench.api import load_model

    model = load_model(tiny_model, dtype="float32").train()
    model.requires_grad_(False)
    model.transformer.sharded_visual = sharded
    calls = []
    model.transformer.visual.register_forward_hook(lambda *args: calls.append(1))
    ids = torch.tensor([[1, 2, 3, 4]])
    out = model(input_ids=ids, labels=ids)
    assert len(calls) == int(sharded)
    model.transformer.sharded_visual = False
    torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, out.loss, atol=0, rtol=0)


@pytest.fixture(scope="module")  # module scope: set up before the module-scoped references
def deepspeed():
    """Skips before the references are built when DeepSpeed is not installed (an optional extra)."""
    return pytest.importorskip("deepspeed", reason="pip install -e '.[deepspeed]' (DeepSpeed's CPU accelerator, gloo)")


@pytest.mark.slow
@pytest.mark.parametrize(("config", "recipe", "atol"), [
    ("deepspeed-zero2", "lora", 1e-6),
    # ZeRO-3 (measured 1.1e-5): its own gradient reduction order, which AdamW scales up on the
    # ViT's and resampler's small gradients; the LLM's LoRA stays within 3e-7.
    ("deepspeed-zero3", "all3", 5e-5),
])
def test_deepspeed_zero_on_two_cpu_processes(deepspeed, make_config, single, config, recipe, atol):
    path = make_config(config, recipe, batch_size=2)
    launch(["-m", "workbench.cli.main", "train", str(path)], config=config)
    one, two = single[recipe], path.parent / "run"
    assert_same_run(one, two, loss_atol=1e-5, weight_atol=atol)
    session = json.loads((two / "workbench_run.json").read_text())["sessions"][-1]["distributed"]
    assert session["type"] == "DEEPSPEED" and session["world_size"] == 2 and session["backend"] == "gloo"
    assert session["deepspeed"]["zero_stage"] == int(config[-1])


def test_deepspeed_on_cpu_names_gloo_and_the_others_ask_accelerate_for_cpu(monkeypatch):
    from workbench.train import distributed

    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert distributed.partial_state_kwargs(cpu=True) == {"cpu": True}
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.partial_state_kwargs(cpu=True) == {"backend": "gloo"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert distributed.partial_state_kwargs(cpu=False) == {"cpu": False}


def test_run_record_counts_machines_from_the_processes_per_machine(monkeypatch):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from workbench.train.distributed import describe

    state = SimpleNamespace(distributed_type=DistributedType.MULTI_GPU, num_processes=16, backend="nccl")
    accelerator = SimpleNamespace(state=state, device=torch.device("cpu"))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun: processes on this machine
    assert describe(accelerator) == {"type": "MULTI_GPU", "world_size": 16, "num_machines": 2, "backend": "nccl",
                                     "device": "cpu"}
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert describe(accelerator)["num_machines"] == 1
