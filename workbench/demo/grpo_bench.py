"""GRPO, DPO and continued SFT on the demo's data for the same wall time (issues 20 and 32, BENCHMARKS.md).

    python -m workbench.demo.grpo_bench R [--seconds 600] [--arms start grpo sft shuffled dpo dpo_shuffled]
                                          [--seeds 0 1] [--lr 1e-4] [--grpo-set K=V ...] [--dpo-set K=V ...]
                                          [--marks 120 240] [--tag T]

R is a `workbench demo` report folder (its base/, data/ and SFT adapter/). Every arm starts from
R/adapter and trains until `--seconds` of training wall time are spent, saving its adapter at the
marks of MARKS on the way (the saving is not counted); then every saved adapter is scored greedily
(Acc@0.5, as the demo) on a held-out set much larger than the demo's 70 queries, so that arms a
few points apart are told apart: R/data/bench-eval-600.jsonl, 600 more images of the demo's
generator (seed 2; the demo's train set is seed 0, its eval set seed 1), made on first use.
"start" scores R/adapter itself (the curves' point at 0 s).

Every trained arm runs at the constant rate --lr (default 1e-4, configs/demo-grpo.yaml's);
--grpo-set overrides the GRPO arms' settings (train.lr too).

  grpo          configs/demo-grpo.yaml
  sft           configs/demo.yaml, continuing the SFT adapter
  shuffled      configs/demo-grpo.yaml with grpo.shuffle_images: each prompt sees another prompt's image
  dpo           configs/demo-dpo.yaml on R/data/pairs.jsonl: pairs mined from R/adapter by `workbench data
                pairs` (8 samples at T 1.0 per training question; made on first use, its time printed and
                kept in R/data/pairs-time.json, not counted in the arm's training time)
  dpo_shuffled  the same with dpo.shuffle_pairs: each prompt is trained on another prompt's pair

Results accumulate over calls in R/grpo_bench.json (one entry per arm + tag and seed, a rerun
replaces its entry) and R/grpo_bench.png (Acc@0.5 against training seconds, one line per entry).
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
from workbench.cli.args import number, whole

MARKS = (30, 60, 120, 240, 360, 480, 600)  # seconds of training at which an arm's adapter is kept
EVAL_IMAGES, EVAL_SEED = 600, 2
PAIR_SAMPLES, PAIR_TEMPERATURE = 8, 1.0


class TimeBudget(TrainerCallback):
    """Stops training after `seconds` of wall time (checked between optimizer steps), saving the
    adapter to folder/at-{mark}s at each mark on the way; the time a save takes is not counted."""

    def __init__(self, seconds: float, folder: Path, marks: tuple[int, ...] = MARKS):
        self.seconds, self.folder, self.started = seconds, folder, 0.0
        self.marks = sorted({m for m in marks if m < seconds} | {seconds})
        self.saved: list[dict] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any):
        self.started = time.time()

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any):
        from workbench.adapters.apply import save_adapter

        while self.marks and time.time() - self.started >= self.marks[0]:
            mark, t = self.marks.pop(0), time.time()
            path = self.folder / f"at-{mark:g}s"
            save_adapter(model, path)
            self.saved.append({"seconds": mark, "steps": state.global_step, "adapter": str(path)})
            self.started += time.time() - t
        if not self.marks:
            control.should_training_stop = True
        return control


class LoadAdapter(TrainerCallback):
    """Continue an SFT adapter with plain SFT (GRPO has grpo.init_from for this)."""

    def __init__(self, folder: Path, source: str):
        self.folder, self.source = folder, source

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any):
        from workbench.train.methods.base import init_from_run

        init_from_run(model, str(self.folder), self.source)


def held_out(report: Path) -> list:
    from workbench.demo.synthetic import make_shapes_dataset
    from workbench.eval.grounding import load_queries

    name = f"bench-eval-{EVAL_IMAGES}"
    path = report / "data" / f"{name}.jsonl"
    if not path.exists():
        make_shapes_dataset(report / "data", EVAL_IMAGES, shapes_per_image=(1, 2), seed=EVAL_SEED, name=name)
    return load_queries(path)


def mined_pairs(report: Path) -> Path:
    """R/data/pairs.jsonl: pairs from R/adapter's own answers on the training questions (made once)."""
    from workbench.cli.main import main as cli

    path = report / "data" / "pairs.jsonl"
    if not path.exists():
        started = time.time()
        cli(["data", "pairs", "--model", str(report / "base"), "--adapter", str(report / "adapter"),
             "--data", str(report / "data" / "train.jsonl"), "--out", str(path), "--samples", str(PAIR_SAMPLES),
             "--temperature", str(PAIR_TEMPERATURE)])
        write_json(report / "data" / "pairs-time.json", {"seconds": round(time.time() - started, 1),
                                                          "pairs": len(path.read_text().splitlines())})
    return path


def score(report: Path, adapters: list[Path]) -> list[dict]:
    """Greedy Acc@0.5 of each adapter on the held-out set (each report in its adapter/eval)."""
    from peft import PeftModel

    from workbench.api import load_model, load_tokenizer
    from workbench.demo.runner import _evaluate

    tokenizer, queries = load_tokenizer(report / "base"), held_out(report)
    scores = []
    for adapter in adapters:
        model = PeftModel.from_pretrained(load_model(report / "base", dtype=torch.float32), adapter).eval()
        scores.append(_evaluate(model, tokenizer, queries, adapter / "eval"))
    return scores


def run_arm(report: Path, arm: str, seconds: float, lr: float, seed: int, grpo_set: tuple[str, ...] = (),
            tag: str = "", dpo_set: tuple[str, ...] = (), marks: tuple[int, ...] = MARKS) -> dict:
    from workbench.demo.runner import DEMO_CONFIG, DPO_CONFIG, GRPO_CONFIG
    from workbench.train.config import load_run_config
    from workbench.train.trainer import train

    name = f"{arm}{tag}-s{seed}"
    if arm == "start":
        (start,) = score(report, [report / "adapter"])
        return {"name": arm, "arm": arm, "curve": [{"seconds": 0, "steps": 0, **start}]}
    out = report / f"bench-{name}"
    common = [f"model={report / 'base'}", f"data.train={report / 'data' / 'train.jsonl'}",
              f"train.output_dir={out}", f"train.lr={lr}", "train.schedule=constant", "train.warmup_ratio=0.0",
              "train.max_steps=100000", "train.save_steps=100000", f"train.seed={seed}"]
    budget = TimeBudget(seconds, out, marks)
    callbacks: list = [budget]
    extra: tuple[str, ...] = ()
    if arm == "sft":
        config = load_run_config(DEMO_CONFIG, common)
        callbacks.append(LoadAdapter(report / "adapter", str(DEMO_CONFIG)))
    elif arm.startswith("dpo"):
        extra = dpo_set
        config = load_run_config(DPO_CONFIG, common + [f"data.train={mined_pairs(report)}",
                                                       f"dpo.init_from={report / 'adapter'}",
                                                       f"dpo.shuffle_pairs={arm == 'dpo_shuffled'}", *dpo_set])
    else:
        extra = grpo_set
        config = load_run_config(GRPO_CONFIG, common + [f"grpo.init_from={report / 'adapter'}",
                                                        f"grpo.shuffle_images={arm == 'shuffled'}", *grpo_set])
    train(config, callbacks=callbacks)
    scores = score(report, [Path(s["adapter"]) for s in budget.saved])
    return {"name": name, "arm": arm, "seed": seed, "lr": config.train.lr, "settings": list(extra),
            "curve": [{**s, **sc} for s, sc in zip(budget.saved, scores)]}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from workbench.atomic import atomic_path

    start = next((r["curve"][0] for r in results if r["arm"] == "start"), None)
    colours = {"grpo": "tab:purple", "sft": "tab:blue", "shuffled": "tab:gray", "dpo": "tab:orange",
               "dpo_shuffled": "tab:brown"}
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for r in results:
        if r["arm"] == "start":
            continue
        points = ([start] if start else []) + r["curve"]
        ax.plot([p["seconds"] for p in points], [p["acc@0.5"] for p in points], "o-", markersize=3,
                label=r["name"], color=colours.get(r["arm"]), alpha=0.9 if r.get("seed", 0) == 0 else 0.55)
    if start:
        ax.axhline(start["acc@0.5"], color="black", linewidth=0.6, linestyle=":", label="after the demo's SFT")
    n = start["n"] if start else (results[0]["curve"][0]["n"] if results and results[0]["curve"] else 0)
    ax.set_xlabel("training wall time (s, 2 CPU cores)")
    ax.set_ylabel(f"held-out Acc@0.5 (greedy, {n} queries)")
    ax.set_title("GRPO, DPO and continued SFT from the demo's SFT adapter")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("report", type=Path)
    p.add_argument("--seconds", type=number(gt=0), default=600.0)
    p.add_argument("--lr", type=number(gt=0), default=1e-4)
    p.add_argument("--seeds", type=whole(0), nargs="+", default=[0])
    arms = ["start", "grpo", "sft", "shuffled", "dpo", "dpo_shuffled"]
    p.add_argument("--arms", nargs="+", default=arms[:4], choices=arms)
    p.add_argument("--grpo-set", nargs="*", default=[], help="--set overrides for the GRPO arms (grpo.temperature=0.7)")
    p.add_argument("--dpo-set", nargs="*", default=[], help="--set overrides for the DPO arms (dpo.beta=0.5)")
    p.add_argument("--marks", type=whole(1), nargs="+", default=list(MARKS), help="seconds at which adapters are kept")
    p.add_argument("--tag", default="", help="suffix of the arms' folders and names (a second setting)")
    args = p.parse_args(argv)
    path = args.report / "grpo_bench.json"
    results = json.loads(path.read_text())["arms"] if path.exists() else []
    for arm in args.arms:
        for seed in ([0] if arm == "start" else args.seeds):
            entry = run_arm(args.report, arm, args.seconds, args.lr, seed, tuple(args.grpo_set), args.tag,
                            tuple(args.dpo_set), tuple(args.marks))
            results = [r for r in results if r["name"] != entry["name"]] + [entry]
            last = entry["curve"][-1]
            print(f"{entry['name']}: {last['steps']} steps, Acc@0.5 {last['acc@0.5']:.3f}", flush=True)
            write_json(path, {"held_out": f"data/bench-eval-{EVAL_IMAGES}.jsonl", "arms": results})
            plot(results, args.report / "grpo_bench.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
