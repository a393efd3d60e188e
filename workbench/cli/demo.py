"""`workbench demo [--out DIR] [--steps N] [--seed S] [--grpo [--grpo-steps N]]`: the whole workbench on CPU in minutes."""

from __future__ import annotations

import argparse
import time

from workbench.cli.args import whole


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="synthetic data -> tiny model -> LoRA training -> eval -> merge, in one report folder",
        description="Generates coloured-shape grounding data and a tiny Qwen-VL-Chat-layout model, trains "
                    "configs/demo.yaml, evaluates Acc@0.5 before and after, merges with verification and "
                    "answers one grounding question with the merged model. Needs no download.")
    p.add_argument("--out", help="report folder (default: runs/demo-YYYYmmdd-HHMMSS); must not hold files")
    p.add_argument("--steps", type=whole(1), help="training steps (default: train.max_steps of configs/demo.yaml)")
    p.add_argument("--seed", type=whole(0), default=0, help="seed of the data, the base model and training")
    p.add_argument("--grpo", action="store_true",
                   help="then GRPO (configs/demo-grpo.yaml) from the SFT adapter, and Acc@0.5 after it")
    p.add_argument("--grpo-steps", type=whole(1), help="GRPO steps (default: train.max_steps of configs/demo-grpo.yaml)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from workbench.demo.runner import run_demo, summary
    from workbench.errors import WorkbenchError

    if args.steps is not None and args.steps <= 0:
        raise WorkbenchError(f"--steps: must be > 0, got {args.steps}")
    out = args.out or time.strftime("runs/demo-%Y%m%d-%H%M%S")
    if args.grpo_steps is not None and (args.grpo_steps <= 0 or not args.grpo):
        raise WorkbenchError(f"--grpo-steps: must be > 0 and goes with --grpo, got {args.grpo_steps}")
    metrics = run_demo(out, steps=args.steps, seed=args.seed, grpo=args.grpo, grpo_steps=args.grpo_steps)
    print(summary(metrics, out))
    return 0
