"""Trainer callbacks: progress bar, metrics.jsonl, and the run guard (NaN stop, Ctrl-C save).

The Trainer already owns the loop, checkpoints and resume; these only watch it and steer it
through `TrainerControl`, so a stop always happens between optimizer steps.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from workbench.atomic import write_text

# transformers 5.2x renamed TrainingArguments.gradient_checkpointing(_kwargs) to activation_checkpointing
# (the old names warn); the GPU machine's older release knows only the old ones.
CHECKPOINTING = ("activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
                 else "gradient_checkpointing")


def checkpoint_every_kth_block(model: torch.nn.Module, every: int) -> int:
    """Selective activation checkpointing: after `gradient_checkpointing_enable`, keep recomputing
    only LLM blocks 0, k, 2k, ...; the others keep their activations (faster, more memory; the
    memory estimate, `inspect --seq-len`, knows both). Returns how many blocks recompute."""
    blocks = [m for n, m in model.named_modules() if type(m).__name__ == "QWenBlock"]
    for i, block in enumerate(blocks):
        block.gradient_checkpointing = block.gradient_checkpointing and i % every == 0
    return sum(b.gradient_checkpointing for b in blocks)


class SelectiveCheckpointing(TrainerCallback):
    """Applies `train.checkpoint_every` once the Trainer has turned checkpointing on for every block."""

    def __init__(self, every: int) -> None:
        self.every = every

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        if getattr(args, CHECKPOINTING) and self.every > 1:
            checkpoint_every_kth_block(kw["model"], self.every)


class ProgressBar(TrainerCallback):
    """One tqdm bar over optimizer steps: ETA from tqdm, loss and tokens/s from the logs."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        if state.is_world_process_zero:
            # `initial` makes the ETA count only this session's steps after a resume.
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stderr)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kw: Any):
        if self.bar is None or not logs:
            return
        if "loss" in logs:
            postfix = {"loss": f"{logs['loss']:.4f}"}
            if "train_tokens_per_second" in logs:
                postfix["tok/s"] = f"{logs['train_tokens_per_second']:.0f}"
            if "reward" in logs:  # GRPO: the loss hovers near 0 by construction; the reward is the news
                postfix["reward"] = f"{logs['reward']:.3f}"
            if "learning_rate" in logs:
                postfix["lr"] = f"{logs['learning_rate']:.2e}"
            self.bar.set_postfix(postfix, refresh=False)
        if "eval_loss" in logs:
            self.bar.write(f"step {state.global_step}: eval_loss {logs['eval_loss']:.4f}")

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class MetricsLogger(TrainerCallback):
    """Appends every log event to metrics.jsonl (one JSON object per line, flushed at once)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        if state.is_world_process_zero and self.path.exists():
            # After a resume, drop what the interrupted session logged past its last checkpoint,
            # so the file reads as one run.
            kept = [line for line in read_metrics(self.path) if line.get("step", 0) <= state.global_step]
            write_text(self.path, "".join(json.dumps(line) + "\n" for line in kept))

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kw: Any):
        if state.is_world_process_zero and logs:
            line = {"step": state.global_step, "time": round(time.time(), 3), **logs}
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(line) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class RunGuard(TrainerCallback):
    """Stops training between optimizer steps on a non-finite loss or a stop request (Ctrl-C, SIGTERM).

    Non-finite loss: no checkpoint is written for that step, so the last checkpoint on disk is the
    last good one. Stop request: a checkpoint is written for the finished step, then the run ends.
    Under DDP the flags are max-reduced so every rank stops at the same step.
    """

    def __init__(self) -> None:
        self.stop_requested = False
        self.reason: str | None = None  # None, "non_finite_loss" or "interrupted"
        self.bad_step: int | None = None
        self._bad_loss: torch.Tensor | None = None

    def observe_loss(self, loss: torch.Tensor) -> None:
        """Called by the trainer after every micro-batch; kept on-device so there is no sync per micro-batch."""
        bad = ~torch.isfinite(loss.detach())
        self._bad_loss = bad if self._bad_loss is None else self._bad_loss | bad

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        flags = torch.tensor([0.0, float(self.stop_requested)], device=args.device)
        if self._bad_loss is not None:
            flags[0] = self._bad_loss.float()
            self._bad_loss = None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        bad, stop = (bool(v) for v in flags.tolist())
        if bad:
            self.reason, self.bad_step = "non_finite_loss", state.global_step
            control.should_save = control.should_evaluate = False
            control.should_training_stop = True
        elif stop:
            self.reason = "interrupted"
            control.should_save = True
            control.should_training_stop = True
        return control

    @contextlib.contextmanager
    def catch_signals(self) -> Iterator[None]:
        """First SIGINT/SIGTERM: finish the step, save, stop. Second SIGINT: abort at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if self.stop_requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.stop_requested = True
            print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
                  "(Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)
