"""GRPO vs continued SFT on the demo's data for the same wall time (issue 20, BENCHMARKS.md).

    python -m workbench.demo.grpo_bench R --seconds 600 [--arms start grpo sft shuffled] [--lr 1e-4] [--grpo-set K=V ...] [--tag T]

R is a `workbench demo` report folder (its base/, data/ and SFT adapter/). Every arm starts from
R/adapter and trains until `--seconds` of training wall time are spent, then its adapter is scored
greedily (Acc@0.5, as the demo) on a held-out set larger than the demo's 70 queries, so that arms
a few points apart are told apart: R/data/bench-eval.jsonl, 300 more images of the demo's
generator (seed 2; the demo's train set is seed 0, its eval set seed 1), made on first use.
"start" scores R/adapter itself.

Every trained arm runs at the constant rate --lr (default 1e-4, configs/demo-grpo.yaml's);
--grpo-set overrides the GRPO arms' settings (train.lr too).

  grpo      configs/demo-grpo.yaml
  sft       configs/demo.yaml, continuing the SFT adapter
  shuffled  configs/demo-grpo.yaml with grpo.shuffle_images: each prompt sees another prompt's image
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from workbench.atomic import write_json


class TimeBudget(TrainerCallback):
    """Stops training after `seconds` of wall time (checked between optimizer steps)."""

    def __init__(self, seconds: float):
        self.seconds, self.started = seconds, 0.0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any):
        self.started = time.time()

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any):
        if time.time() - self.started >= self.seconds:
            control.should_training_stop = True
        return control


class LoadAdapter(TrainerCallback):
    """Continue an SFT adapter with plain SFT (GRPO has grpo.init_from for this)."""

    def __init__(self, folder: Path, source: str):
        self.folder, self.source = folder, source

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any):
        from workbench.train.grpo_trainer import init_from_run

        init_from_run(model, str(self.folder), self.source)


EVAL_IMAGES, EVAL_SEED = 300, 2


def held_out(report: Path) -> list:
    from workbench.demo.synthetic import make_shapes_dataset
    from workbench.eval.grounding import load_queries

    path = report / "data" / "bench-eval.jsonl"
    if not path.exists():
        make_shapes_dataset(report / "data", EVAL_IMAGES, shapes_per_image=(1, 2), seed=EVAL_SEED, name="bench-eval")
    return load_queries(path)


def score(report: Path, adapter: Path, out: Path) -> dict:
    from peft import PeftModel

    from workbench.api import load_model, load_tokenizer
    from workbench.demo.runner import _evaluate

    model = PeftModel.from_pretrained(load_model(report / "base", dtype=torch.float32), adapter).eval()
    return _evaluate(model, load_tokenizer(report / "base"), held_out(report), out)


def run_arm(report: Path, arm: str, seconds: float, lr: float, seed: int, grpo_set: tuple[str, ...] = (),
            tag: str = "") -> dict:
    from workbench.demo.runner import DEMO_CONFIG, GRPO_CONFIG
    from workbench.train.config import load_run_config
    from workbench.train.trainer import train

    out = report / f"bench-{arm}{tag}"
    if arm == "start":
        return {"arm": arm, "steps": 0, "train_seconds": 0.0, **score(report, report / "adapter", out / "eval")}
    common = [f"model={report / 'base'}", f"data.train={report / 'data' / 'train.jsonl'}",
              f"train.output_dir={out}", f"train.lr={lr}", "train.schedule=constant", "train.warmup_ratio=0.0",
              "train.max_steps=100000", "train.save_steps=100000", f"train.seed={seed}"]
    callbacks: list = [TimeBudget(seconds)]
    if arm == "sft":
        config = load_run_config(DEMO_CONFIG, common)
        callbacks.append(LoadAdapter(report / "adapter", str(DEMO_CONFIG)))
    else:
        config = load_run_config(GRPO_CONFIG, common + [f"grpo.init_from={report / 'adapter'}",
                                                        f"grpo.shuffle_images={arm == 'shuffled'}", *grpo_set])
    started = time.time()
    result = train(config, callbacks=callbacks)
    seconds_used = time.time() - started
    scores = score(report, result.output_dir, out / "eval")
    return {"arm": arm + tag, "grpo_set": list(grpo_set) if arm != "sft" else [], "steps": result.global_step, "train_seconds": round(seconds_used, 1), **scores}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("report", type=Path)
    p.add_argument("--seconds", type=float, default=600.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arms", nargs="+", default=["start", "grpo", "sft", "shuffled"], choices=["start", "grpo", "sft", "shuffled"])
    p.add_argument("--grpo-set", nargs="*", default=[], help="--set overrides for the GRPO arms (grpo.temperature=0.7)")
    p.add_argument("--tag", default="", help="suffix of the arms' folders and names (a second setting)")
    args = p.parse_args(argv)
    results = []
    for arm in args.arms:
        results.append(run_arm(args.report, arm, args.seconds, args.lr, args.seed, tuple(args.grpo_set), args.tag))
        print(json.dumps(results[-1]), flush=True)
        write_json(args.report / f"grpo_bench{args.tag}.json", {"seconds": args.seconds, "lr": args.lr, "arms": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
