"""loss_curve.png from metrics.jsonl: training loss per logged step, eval loss, learning rate."""

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
    if not train and not evals:
        return False
    if grounding["acc@0.5"]:  # a second panel: what a grounding user trains for
        fig, (ax, acc_ax) = plt.subplots(2, 1, figsize=(8, 7), dpi=100, sharex=True,
                                         gridspec_kw={"height_ratios": [3, 2]})
        acc_ax.plot(*zip(*grounding["acc@0.5"]), "o-", label="held-out Acc@0.5", color="tab:green", markersize=4)
        acc_ax.plot(*zip(*grounding["mean_iou"]), "s--", label="mean IoU", color="tab:olive", markersize=3)
        acc_ax.set_ylim(0, 1)
        acc_ax.set_ylabel("grounding")
        acc_ax.set_xlabel("optimizer step")
        acc_ax.grid(alpha=0.3)
        acc_ax.legend(loc="lower right")
    else:
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
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
