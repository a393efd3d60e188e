"""loss_curve.png from metrics.jsonl: training loss per logged step, eval loss, learning rate; held-out
Acc@0.5 and the GRPO reward in panels below when logged."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402

from workbench.atomic import atomic_path  # noqa: E402


def plot_loss_curve(metrics: list[dict[str, Any]], path: Path, title: str = "") -> bool:
    """Write the plot atomically; returns False (and writes nothing) when there is no loss to plot."""
    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m and math.isfinite(m["loss"])]
    evals = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m and math.isfinite(m["eval_loss"])]
    lrs = [(m["step"], m["learning_rate"]) for m in metrics if "learning_rate" in m]
    grounding = {key: [(m["step"], m[f"eval_grounding_{key}"]) for m in metrics if f"eval_grounding_{key}" in m]
                 for key in ("acc@0.5", "mean_iou")}
    reward = [(m["step"], m["reward"], m.get("reward_std", 0.0)) for m in metrics if "reward" in m]
    if not train and not evals:
        return False
    # extra panels under the loss: held-out grounding (what a grounding user trains for), GRPO reward
    panels = [name for name, has in (("grounding", grounding["acc@0.5"]), ("reward", reward)) if has]
    fig, axes = plt.subplots(1 + len(panels), 1, figsize=(8, 4.5 + 2.5 * len(panels)), dpi=100, sharex=True,
                             gridspec_kw={"height_ratios": [3] + [2] * len(panels)}, squeeze=False)
    ax = axes[0][0]
    for name, panel in zip(panels, (row[0] for row in axes[1:])):
        if name == "grounding":
            panel.plot(*zip(*grounding["acc@0.5"]), "o-", label="held-out Acc@0.5", color="tab:green", markersize=4)
            panel.plot(*zip(*grounding["mean_iou"]), "s--", label="mean IoU", color="tab:olive", markersize=3)
            panel.set_ylim(0, 1)
            panel.set_ylabel("grounding")
        else:
            steps, mean, std = zip(*reward)
            panel.plot(steps, mean, label="GRPO reward (mean)", color="tab:purple")
            panel.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                               color="tab:purple", alpha=0.2, label="within-group std")
            panel.set_ylabel("reward")
        panel.set_xlabel("optimizer step")
        panel.grid(alpha=0.3)
        panel.legend(loc="lower right")
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", color="tab:orange", markersize=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if lrs:
        lr_ax = ax.twinx()
        lr_ax.plot(*zip(*lrs), label="learning rate", color="tab:gray", linestyle="--", linewidth=0.8)
        lr_ax.set_ylabel("learning rate")
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        more_handles, more_labels = lr_ax.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, loc="upper right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return True
