"""Crashes and full disks: SIGKILL during a merge or a checkpoint save, then a rerun / --resume, gives the
right result and leaves no debris; a full disk gives a clear error and keeps nothing incomplete."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from workbench.cli.main import main

REPO = Path(__file__).resolve().parents[1]


def _run_until_marker(script: str, marker: Path, timeout: float = 180) -> subprocess.Popen:
    """Start `script` in a new Python; return once it has written `marker` (it then sleeps)."""
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended before the crash point:\n{proc.stdout.read()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("the crash point was never reached")
        time.sleep(0.05)
    return proc


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def model_and_adapter(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    from workbench import load_model
    from workbench.demo.tiny import make_tiny_model_dir

    root = tmp_path_factory.mktemp("crash")
    model = make_tiny_model_dir(root / "model")
    torch.manual_seed(0)
    peft = get_peft_model(load_model(model), LoraConfig(r=2, target_modules=["c_attn", "w1"], init_lora_weights=False))
    peft.save_pretrained(root / "adapter")
    return model, root / "adapter"


def _merged(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_sigkill_during_merge_then_rerun(tmp_path, model_and_adapter):
    model, adapter = model_and_adapter
    marker, out = tmp_path / "crash-point", tmp_path / "merged"
    proc = _run_until_marker(f"""
        import time
        from pathlib import Path
        from workbench.merge.merge import merge_adapter
        from workbench.model.shard_writer import ShardWriter
        add = ShardWriter.add
        def slow_add(self, name, tensor):
            add(self, name, tensor)
            if len(self.written) >= 1:   # a shard is on disk in the temp folder: die here
                Path({str(marker)!r}).touch()
                time.sleep(600)
        ShardWriter.add = slow_add
        merge_adapter({str(model)!r}, {str(adapter)!r}, {str(out)!r}, max_shard_size=20000)
    """, marker)
    _kill(proc)
    debris = list(tmp_path.glob(".merged.merging-*"))
    assert debris and not out.exists()  # what the kill left: a temp folder, no output

    assert main(["merge", "--base", str(model), "--adapter", str(adapter), "--out", str(out)]) == 0
    assert not list(tmp_path.glob(".merged.*")), "the rerun removed the dead merge's temp folder"
    clean = tmp_path / "clean"
    assert main(["merge", "--base", str(model), "--adapter", str(adapter), "--out", str(clean)]) == 0
    a, b = _merged(out), _merged(clean)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


TRAIN = """
    import sys, time
    from pathlib import Path
    from workbench.train import trainer
    from workbench.train.config import load_run_config
    save = trainer.WorkbenchTrainer._save
    def dying_save(self, output_dir=None, state_dict=None):
        save(self, output_dir, state_dict)
        if self.state.global_step == 4:   # checkpoint-4 has its adapter, not yet its trainer state
            Path({marker!r}).touch()
            time.sleep(600)
    trainer.WorkbenchTrainer._save = dying_save
    trainer.train(load_run_config({config!r}))
"""


def test_sigkill_during_checkpoint_save_then_resume(tmp_path, run_config):
    from workbench.train.config import load_run_config
    from workbench.train.trainer import train

    settings = dict(max_steps=6, save_steps=2, save_total_limit=None)
    straight = train(load_run_config(run_config(folder=tmp_path / "a", **settings)))
    config, marker = run_config(folder=tmp_path / "b", **settings), tmp_path / "crash-point"
    _kill(_run_until_marker(TRAIN.format(marker=str(marker), config=str(config)), marker))
    out = tmp_path / "b" / "run"
    assert (out / "checkpoint-4").is_dir() and not (out / "checkpoint-4" / "trainer_state.json").exists()

    resumed = train(load_run_config(config), resume=True)  # from checkpoint-2, the last complete one
    assert resumed.status == "completed" and resumed.global_step == 6
    run = json.loads((out / "workbench_run.json").read_text())
    assert run["sessions"][-1]["resumed_from"] == "checkpoint-2"
    assert all((p / "trainer_state.json").is_file() for p in out.glob("checkpoint-*")), "no incomplete checkpoint"
    a = load_file(straight.output_dir / "adapter_model.safetensors")
    b = load_file(out / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0, msg=key)


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (root only; skipped where mounting is not allowed).

    Unmounted lazily: a plain umount fails while a failed test's process still holds a file there
    ("target is busy") and left the mount behind. pytest runs this teardown after a failure and
    after Ctrl-C too.
    """
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=True)
        assert not os.path.ismount(mount)


def test_disk_full_during_merge(small_disk, model_and_adapter, capsys):
    model, adapter = model_and_adapter
    out = small_disk / "merged"
    assert sum(f.stat().st_size for f in model.iterdir()) > 2 * 2**20  # the merge cannot fit
    assert main(["merge", "--base", str(model), "--adapter", str(adapter), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no space left on the device" in err and "\n" not in err, err
    assert list(small_disk.iterdir()) == [], "nothing incomplete is kept"


def test_disk_full_during_checkpoint_save(small_disk, run_config, monkeypatch, capsys):
    from transformers import TrainerCallback

    from workbench.train import record

    class FillTheDisk(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 1:  # after the run folder is written, before checkpoint-2
                filler = small_disk / "filler"
                with filler.open("wb") as f:
                    try:
                        while True:
                            f.write(b"\0" * 65536)
                    except OSError:
                        pass

    monkeypatch.setattr(record, "check_disk_space", lambda *a, **k: None)  # the real check would refuse early
    from workbench.train import trainer

    train = trainer.train
    monkeypatch.setattr(trainer, "train", lambda config, resume=False, callbacks=None:
                        train(config, resume, [FillTheDisk(), *(callbacks or [])]))
    config = run_config(folder=small_disk / "cfg", max_steps=4, save_steps=2)
    assert main(["train", str(config)]) == 2
    errors = [line[line.index("error:"):] for line in capsys.readouterr().err.replace("\r", "\n").splitlines()
              if "error:" in line]
    assert len(errors) == 1 and "no space left on the device" in errors[0], errors
    assert not list((small_disk / "cfg" / "run").glob("checkpoint-*")), "the cut-short checkpoint is gone"


FAILING_TESTS = '''
import pytest
from tests.train.test_crash_hygiene import small_disk  # noqa: F401

def test_fails_holding_a_file(small_disk):
    held = (small_disk / "held").open("wb")  # keeps the mount busy past the test
    held.write(b"x")
    assert False

def test_interrupted(small_disk):
    raise KeyboardInterrupt
'''


@pytest.mark.parametrize("test", ["test_fails_holding_a_file", "test_interrupted"])
def test_small_disk_is_unmounted_after_a_failed_or_interrupted_test(tmp_path, test):
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    (tmp_path / "test_inner.py").write_text(FAILING_TESTS)
    base = tmp_path / "base"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={base}",
                           f"{tmp_path / 'test_inner.py'}::{test}"], cwd=REPO.parent, capture_output=True, text=True)
    assert done.returncode in (1, 2), done.stdout  # failed / interrupted, as planned
    mounts = Path("/proc/mounts").read_text()
    assert str(base) not in mounts, mounts
