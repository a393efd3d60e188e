"""The Trainer every method runs on: transformers' Trainer with the recipe's parameter groups, a
split-invariant loss, the run guard, PEFT saves (trained-in-place parameters included) and grounding
evaluation. SFT uses it as it is; the other methods (workbench/train/methods/) subclass it and
override what one step computes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import Trainer

from workbench import run_folder
from workbench.model.modeling import IGNORE_INDEX
from workbench.train import distributed
from workbench.train.callbacks import RunGuard
from workbench.train.config import RunConfig


class WorkbenchTrainer(Trainer):
    """Trainer with the recipe's parameter groups, a split-invariant loss and the run guard."""

    def __init__(self, *args: Any, run_config: RunConfig, guard: RunGuard, grounding: Any = None,
                 has_loss_eval: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.run_config, self.guard = run_config, guard
        self.grounding, self.has_loss_eval = grounding, has_loss_eval
        # The model returns the mean over its own micro-batch. Asking the Trainer for
        # num_items_in_batch (the label-token count of the whole optimizer step, over all
        # micro-batches and ranks) lets compute_loss rescale it into the global token mean, so
        # the loss and the gradients do not depend on how the batch is split.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True  # count labels[:, 1:], the positions the model predicts

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if distributed.cpu_fsdp_requested():  # accelerate would quietly run an FSDP launch on CPU as DDP
            distributed.enable_cpu_fsdp(self.accelerator)
            self.is_fsdp_enabled = True
        if distributed.shards_parameters(self.accelerator):
            self.model.get_base_model().transformer.sharded_visual = True

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            from workbench.adapters.apply import param_groups

            opt_model = self.model if model is None else model
            groups = param_groups(opt_model, self.run_config.recipe, base_lr=self.args.learning_rate,
                                  weight_decay=self.args.weight_decay)
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None):
        outputs = model(**inputs)
        loss = outputs.loss
        if num_items_in_batch is not None:
            local = (inputs["labels"][:, 1:] != IGNORE_INDEX).sum()
            # DDP averages gradients over ranks, hence the factor num_processes.
            loss = loss * (local / num_items_in_batch) * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # PEFT's save_pretrained leaves out parameters a recipe trains in place (`train:`);
        # save_adapter writes them into the same adapter file, for checkpoints and the final save.
        from workbench.adapters.apply import save_adapter

        if not self.args.should_save:
            # Under FSDP every rank gets here, the others with an empty gathered state dict: their
            # write raced rank 0's and could leave an empty adapter behind.
            return
        output_dir = output_dir or self.args.output_dir
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        # Under FSDP / DeepSpeed the Trainer passes the gathered full `state_dict`: use it.
        with distributed.without_checkpoint_wrappers(self.accelerator.unwrap_model(self.model)) as model:
            save_adapter(model, output_dir, state_dict=state_dict)

    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """The Trainer's loss evaluation (when the data has an eval split) plus grounding accuracy
        (train.eval_grounding), in one metrics dict, so `metric_for_best` and early stopping can use
        either; the grounding metrics are logged like any other (trackers, metrics.jsonl)."""
        metrics: dict[str, float] = {}
        if self.has_loss_eval:
            metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if self.grounding is not None:
            found = self.grounding(self.model, self.state.global_step, draw=self.is_world_process_zero())
            found = {f"{metric_key_prefix}_{k}": v for k, v in found.items()}
            self.log(found)
            metrics.update(found)
            if not self.has_loss_eval:  # super().evaluate did not run, so tell the callbacks here
                self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        # A save that fails (a full disk) leaves no half-written checkpoint-N for --resume to trip on.
        try:
            super()._save_checkpoint(model, trial)
        except BaseException:
            if self.is_world_process_zero():
                run_folder.remove_incomplete_checkpoints(Path(self.args.output_dir))
            raise

    def training_step(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.guard.observe_loss(loss)
        return loss
