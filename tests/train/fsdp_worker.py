"""Trains several run configs one after another in one `accelerate launch` (for tests/train/test_fsdp.py).

    accelerate launch --config_file configs/accelerate/fsdp.yaml tests/train/fsdp_worker.py A.yaml B.yaml@3

`B.yaml@3`: rank 0 alone receives SIGINT during step 3, so the real handler and the cross-rank
stop flag stop every rank after step 3 with a checkpoint, as a Ctrl-C would. One launch for
several runs saves the launch cost (about half a minute on two cores) of each extra run.
"""

from __future__ import annotations

import signal
import sys

from accelerate import PartialState
from transformers import TrainerCallback

from workbench.train.config import load_run_config
from workbench.train.trainer import train


class InterruptRankZero(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step + 1 == self.step and PartialState().is_main_process:
            signal.raise_signal(signal.SIGINT)


def main(specs: list[str]) -> None:
    for spec in specs:
        path, _, stop = spec.partition("@")
        result = train(load_run_config(path), callbacks=[InterruptRankZero(int(stop))] if stop else None)
        print(f"worker: {path}: {result.status} at step {result.global_step}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
