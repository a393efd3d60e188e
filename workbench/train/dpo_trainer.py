"""`method: dpo`: direct preference optimisation on the SFT Trainer (workbench_trainer.py).

The Trainer still owns the loop, the optimizer and schedule, checkpoints, resume, trackers, the run
folder and the evaluation inside training (loss on data.eval, greedy Acc@0.5 with
train.eval_grounding). A micro-batch is B preference pairs (data/preference.py); its step:

1. the reference: the chosen and rejected answers' log-probabilities under the model with its
   adapters disabled (the base), once per batch, without grad, in eval mode (dpo.reference_logprobs);
2. the policy's, with grad; each prompt and its images run once for both answers (logprobs.py);
3. TRL's DPO loss on them (dpo.trl_loss). Its reward statistics are logged with the loss.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from workbench.train import dpo
from workbench.train.workbench_trainer import WorkbenchTrainer


class DPOTrainer(WorkbenchTrainer):
    """WorkbenchTrainer whose step is a DPO step on preference pairs (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.spec = self.run_config.dpo
        self.model_accepts_loss_kwargs = False  # the loss is a mean over pairs, not label tokens
        self._stats: dict[str, list[float]] = defaultdict(list)

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None):
        peft_model = self.accelerator.unwrap_model(model)
        lm = peft_model.get_base_model()
        ref_chosen, ref_rejected = dpo.reference_logprobs(peft_model, lm, inputs)
        policy = dpo.pair_logprobs(lm, inputs)
        loss, metrics = dpo.trl_loss(policy, ref_chosen, ref_rejected, beta=self.spec.beta, loss=self.spec.loss,
                                     label_smoothing=self.spec.label_smoothing, training=model.training)
        prefix = "" if model.training else "eval_"
        for key, value in metrics.items():
            self._stats[prefix + key].append(value)
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model: torch.nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None):
        # a pair batch has no `labels`, so the Trainer would call the model directly: the DPO loss instead
        with torch.no_grad():
            loss = self.compute_loss(model, self._prepare_inputs(inputs))
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # a training log takes the DPO metrics since the last one; an evaluation's log takes its own
        prefix = "eval_" if "eval_loss" in logs else "" if "loss" in logs else None
        if prefix is not None:
            mine = {k: v for k, v in self._stats.items() if k.startswith("eval_") == (prefix == "eval_")}
            logs = {**logs, **{k: sum(v) / len(v) for k, v in mine.items()}}
            for key in mine:
                del self._stats[key]
        super().log(logs, start_time)
