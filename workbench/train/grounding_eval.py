"""Grounding accuracy while training (`train.eval_grounding`): the code of `workbench eval grounding`,
run on the model being trained at each evaluation, its boxes drawn into the run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from workbench.train.config import GroundingEval, RunConfig

PREFIX = "grounding_"  # metric names: eval_grounding_acc@0.5, eval_grounding_mean_iou, ...
LOGGED = ("acc@0.5", "mean_iou", "parse_failure_rate")


class GroundingEvaluator:
    def __init__(self, spec: GroundingEval, config: RunConfig, tokenizer: Any, out_dir: Path):
        from workbench.eval.grounding import load_queries

        files = spec.data or config.data.eval
        root = spec.image_root or config.data.image_root
        queries = [q for f in files for q in load_queries(f, root, config.data.allow_outside_root)]
        self.queries = queries[:spec.max_samples] if spec.max_samples else queries
        self.spec, self.tokenizer, self.out_dir = spec, tokenizer, out_dir
        self.files = list(files)

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, step: int, draw: bool) -> dict[str, float]:
        from workbench.eval.grounding import evaluate_grounding

        was_training = model.training
        model.eval()
        try:
            report = evaluate_grounding(
                model, self.tokenizer, self.queries, prompt=self.spec.prompt, batch_size=self.spec.batch_size,
                max_new_tokens=self.spec.max_new_tokens,
                out_dir=self.out_dir / f"step-{step}" if draw else None, n_images=self.spec.images)
        finally:
            model.train(was_training)
        return {f"{PREFIX}{k}": float(report["metrics"][k]) for k in LOGGED}


def check_grounding_config(config: RunConfig) -> None:
    """Refuse an eval_grounding section that has no data before anything is loaded."""
    from workbench.errors import ConfigError

    spec = config.train.eval_grounding
    if spec is not None and not (spec.data or config.data.eval):
        raise ConfigError(f"{config.source}: train.eval_grounding.data: needed (a held-out grounding file), "
                          "or give data.eval")
