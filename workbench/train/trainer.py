"""`workbench train`: a run config -> a PEFT adapter folder with its run record.

transformers' Trainer owns the loop, gradient accumulation, schedules, checkpoints, resume
(data order, optimizer, scheduler, RNG) and accelerate (DDP / FSDP / DeepSpeed). The workbench
adds only what it cannot do: the optimizer's per-component parameter groups from the recipe,
a token-weighted loss that is the same for any split of the global batch, the run guard
(NaN stop, Ctrl-C save), and the run folder (record, metrics, plot, summary).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import DistributedType
from transformers import EarlyStoppingCallback, Trainer, TrainingArguments, set_seed
from transformers.integrations import TensorBoardCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from workbench import run_folder
from workbench.atomic import write_json
from workbench.errors import ConfigError
from workbench.model.modeling import IGNORE_INDEX
from workbench.train import distributed, record
from workbench.train.callbacks import MetricsLogger, ProgressBar, RunGuard, SelectiveCheckpointing
from workbench.train.config import RunConfig
from workbench.train.plots import plot_loss_curve


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


@dataclass
class RunResult:
    output_dir: Path
    status: str  # completed | interrupted | non_finite_loss
    global_step: int
    model: torch.nn.Module  # the trained PeftModel, for in-process use
    bad_step: int | None = None  # where the loss became NaN/inf
    best_checkpoint: str | None = None  # with train.metric_for_best: the checkpoint kept as the adapter


def training_arguments(config: RunConfig, has_eval: bool) -> TrainingArguments:
    t = config.train
    precision = config.mixed_precision()
    has_eval = has_eval or t.eval_grounding is not None
    best = None if t.metric_for_best is None else t.metric_for_best.removeprefix("eval_")
    greater = t.greater_is_better if t.greater_is_better is not None else best is not None and "loss" not in best
    return TrainingArguments(
        output_dir=t.output_dir,
        seed=t.seed,
        learning_rate=t.lr,
        lr_scheduler_type=t.schedule,
        optim=t.optimizer,
        # transformers reads a warmup_steps below 1 as a ratio of the run
        warmup_steps=t.warmup_steps if t.warmup_steps > 0 else t.warmup_ratio,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_epsilon=t.adam_epsilon,
        max_grad_norm=t.max_grad_norm,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size or t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        gradient_checkpointing=t.gradient_checkpointing,
        # non-reentrant: no need for inputs that require grad, works with frozen embeddings
        gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=t.logging_steps,
        logging_nan_inf_filter=False,  # a NaN must show in the logs, not be averaged away
        # GRPO batches are queries (no input_ids to count)
        include_num_input_tokens_seen="non_padding" if config.method == "sft" else "no",
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.evaluation_steps() if has_eval else None,
        metric_for_best_model=best,
        greater_is_better=greater if best else None,
        load_best_model_at_end=best is not None,  # the final adapter is the best checkpoint's
        prediction_loss_only=True,
        dataloader_num_workers=config.data.num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False,  # the collator's batch goes to the model as it is
        use_cpu=_cpu_only(),
        # TrainingArguments sets accelerate's process group up again: the same backend as train()'s
        ddp_backend=distributed.partial_state_kwargs(_cpu_only()).get("backend"),
        # every trainable parameter is used in every step (text-only batches run the ViT on a
        # dummy image, docs/qwen-vl.md §5.7), so DDP need not search the graph for unused ones
        ddp_find_unused_parameters=False,
        report_to=[] if "none" in t.report_to else list(t.report_to),
        disable_tqdm=True,  # ProgressBar replaces the default bar
    )


def _cpu_only() -> bool:
    # accelerate only picks gloo (MULTI_CPU) for a multi-process launch when told it is on CPU;
    # DeepSpeed on CPU is the exception (see distributed.partial_state_kwargs).
    return not torch.cuda.is_available() and not distributed.cpu_deepspeed_requested()


@dataclass
class TrainData:
    train: Any
    eval: Any | None
    collator: Any
    files: list[Path]  # the data files, for the run record's fingerprint


def build_model(config: RunConfig, device: torch.device) -> torch.nn.Module:
    """Base model in the run's dtype, quantised and adapted per the recipe (a PeftModel)."""
    from workbench.adapters.apply import apply_recipe
    from workbench.api import load_model

    state = PartialState()
    # FSDP and DeepSpeed place (and shard) the weights themselves; the others load straight onto
    # their device, which bitsandbytes needs to quantise there.
    sharded = state.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    model = load_model(config.model, dtype=config.dtype, device="cpu" if sharded else device)
    if config.image_size is not None:
        set_image_size(model, config.image_size, f"{config.source}: image_size")
    model.config.use_cache = False
    model.loss_chunk_size = config.train.loss_chunk_size
    return apply_recipe(model, config.recipe)


def set_image_size(model: torch.nn.Module, size: int, where: str) -> None:
    """Train at `size` px (the paper's stage 1 at 224, stages 2-3 at 448).

    The data pipeline preprocesses images at `config.visual["image_size"]`, and the ViT resizes
    its 16x16 position table (and the resampler its key table) to the new patch grid in every
    forward (`get_abs_pos`, docs/qwen-vl.md §4.3): 224 px is a 16x16 grid, used as it is. No weight changes
    shape, so an adapter trained at any size loads onto the base; only this run's model is changed.
    """
    check_image_size(size, model.config.visual["patch_size"], where)
    model.config.visual["image_size"] = size
    model.transformer.visual.image_size = size


def check_image_size(size: int, patch: int, where: str) -> None:
    if size % patch:
        nearest = max(1, round(size / patch)) * patch
        raise ConfigError(f"{where}: {size} is not a multiple of the patch size {patch}; try {nearest}")


def build_data(config: RunConfig, tokenizer: Any, image_size: int) -> TrainData:
    """The data engineer's pipeline: every record is read and checked here, before any weight is loaded."""
    from workbench.data.collator import SFTCollator
    from workbench.data.dataset import load_sft_data
    from workbench.data.records import find_files

    files = find_files([*config.data.train, *config.data.eval])
    if config.method == "grpo":  # prompts and true boxes; the rollout builds the tensors
        from workbench.train.grpo_trainer import QueryCollator, load_grpo_queries

        queries = load_grpo_queries(config)
        if PartialState().is_main_process:
            print(f"grpo: {len(queries)} grounding queries in {', '.join(config.data.train)}")
        return TrainData(train=queries, eval=None, files=files, collator=QueryCollator(image_size))
    data = load_sft_data(config.data, tokenizer, image_size=image_size)
    if PartialState().is_main_process:
        print(data.report.summary())
    return TrainData(train=data.train, eval=data.eval, files=files,
                     collator=SFTCollator(tokenizer.pad_token_id, config.data.pad_to_multiple_of))


def _kept_checkpoints(config: RunConfig, data: TrainData) -> int:
    """How many checkpoints the run keeps on disk at most (for the disk-space check)."""
    t = config.train
    if t.save_total_limit:
        return t.save_total_limit
    steps = t.max_steps
    if steps <= 0:
        per_step = t.batch_size * t.gradient_accumulation_steps * PartialState().num_processes
        steps = math.ceil(len(data.train) * t.epochs / per_step)
    return max(1, steps // t.save_steps)


@dataclass
class Preflight:
    """Everything checked before a weight is read."""

    model_dir: Path
    tokenizer: Any
    image_size: int
    resume_from: Path | None
    schedule_changes: list[str]


def preflight(config: RunConfig, resume: bool) -> Preflight:
    """The checks that need no weights, in the order a user's mistakes are likeliest: the model folder
    (or a hub id that resolves), the output folder, the image root, the config of the run's pieces."""
    from workbench.api import load_tokenizer
    from workbench.model.checkpoint import resolve_model_dir
    from workbench.model.config import load_config
    from workbench.train.grounding_eval import check_grounding_config

    model_dir = resolve_model_dir(config.model)
    model_config = load_config(model_dir)
    out = Path(config.train.output_dir)
    resume_from = record.check_output_dir(out, resume=resume)
    changes = record.check_resume(out, config, PartialState().num_processes) if resume else []
    if config.data.image_root is not None and not Path(config.data.image_root).is_dir():
        raise ConfigError(f"{config.source}: data.image_root: {config.data.image_root} is not a folder")
    check_grounding_config(config)
    image_size = model_config.visual["image_size"]
    if config.image_size is not None:
        check_image_size(config.image_size, model_config.visual["patch_size"], f"{config.source}: image_size")
        image_size = config.image_size
    return Preflight(model_dir, load_tokenizer(model_dir), image_size, resume_from, changes)


def train(config: RunConfig, resume: bool = False, callbacks: list | None = None) -> RunResult:
    """Run (or with `resume`, continue) the training a run config describes; returns where it ended.

    Nothing is written to train.output_dir until the model, the data and the folder have been checked.
    """
    # sets up the process group under `accelerate launch`
    state = PartialState(**distributed.partial_state_kwargs(cpu=_cpu_only()))
    out = Path(config.train.output_dir)
    distributed.check_launch(config)
    # Every rank checks before any rank writes, or rank 1 would find rank 0's fresh record.
    checked = preflight(config, resume)
    data = build_data(config, checked.tokenizer, checked.image_size)
    grounding = None
    if config.train.eval_grounding is not None:
        from workbench.train.grounding_eval import GroundingEvaluator

        grounding = GroundingEvaluator(config.train.eval_grounding, config, checked.tokenizer, out / "grounding")
    state.wait_for_everyone()

    set_seed(config.train.seed)  # before the adapter is built: LoRA init is random
    model = build_model(config, state.device)
    if config.grpo is not None and config.grpo.init_from:
        from workbench.train.grpo_trainer import init_from_run

        init_from_run(model, config.grpo.init_from, config.source)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    run_record = None
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        for folder in run_folder.remove_incomplete_checkpoints(out):
            print(f"removed {folder}: a checkpoint save that was cut short")
        record.check_disk_space(out, trainable, _kept_checkpoints(config, data))
        run_record = record.start_run_record(out, config, trainable, data.files, checked.resume_from,
                                             processes=state.num_processes)
        record.write_yaml(out / run_folder.RESOLVED_CONFIG_NAME, config.to_dict())
        write_json(out / run_folder.RECORD_NAME, run_record)
        print(start_summary(config, model, data, checked, state.num_processes))

    guard = RunGuard()
    extra = [EarlyStoppingCallback(config.train.early_stopping_patience)] if config.train.early_stopping_patience else []
    trainer_cls, extra_kwargs = WorkbenchTrainer, {}
    if config.method == "grpo":
        from workbench.train.grpo_trainer import GRPOTrainer

        trainer_cls, extra_kwargs = GRPOTrainer, {"tokenizer": checked.tokenizer}
    trainer = trainer_cls(
        model=model, args=training_arguments(config, has_eval=data.eval is not None), **extra_kwargs,
        data_collator=data.collator, train_dataset=data.train,
        # grounding alone still needs an eval "dataset" for the Trainer to schedule evaluations
        eval_dataset=data.eval if data.eval is not None else (grounding.queries if grounding else None),
        run_config=config, guard=guard, grounding=grounding, has_loss_eval=data.eval is not None,
        callbacks=[ProgressBar(), MetricsLogger(out / run_folder.METRICS_NAME), guard,
                   SelectiveCheckpointing(config.train.checkpoint_every), *extra, *(callbacks or [])],
    )
    for default in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(default)
    cache = use_vit_cache(trainer, config, data, checked.image_size) if config.data.vit_cache else None
    if state.is_main_process:
        run_record["sessions"][-1]["distributed"] = distributed.describe(trainer.accelerator)
        if cache is not None:
            print(cache.summary())
            run_record["sessions"][-1]["vit_cache"] = {"folder": str(cache.folder), "computed": cache.computed,
                                                       "reused": cache.reused}
        write_json(out / run_folder.RECORD_NAME, run_record)
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback):  # one fixed folder instead of runs/<date>
            callback.logging_dir = str(out / "tensorboard")

    started = time.time()
    with guard.catch_signals():
        trainer.train(resume_from_checkpoint=str(checked.resume_from) if checked.resume_from else None)
    status = guard.reason or "completed"
    if status == "completed":
        trainer.save_model(str(out))  # collective under FSDP/DeepSpeed: every rank calls it
        if state.is_main_process:
            checked.tokenizer.save_pretrained(out)  # the run folder loads on its own (AutoTokenizer)
    state.wait_for_everyone()

    result = RunResult(output_dir=out, status=status, global_step=trainer.state.global_step,
                       model=trainer.model, bad_step=guard.bad_step,
                       best_checkpoint=trainer.state.best_model_checkpoint)
    if state.is_main_process:
        metrics = trainer.state.log_history  # every log event, restored from the checkpoint on resume
        plot_loss_curve(metrics, out / run_folder.PLOT_NAME, title=f"{Path(config.source).name}: {status}")
        record.finish_run_record(run_record, status=status, global_step=result.global_step,
                                 seconds=time.time() - started, metrics=metrics, output_dir=out,
                                 bad_step=guard.bad_step, best_checkpoint=result.best_checkpoint)
        write_json(out / run_folder.RECORD_NAME, run_record)
        print(record.summary(run_record, out))
    return result


def use_vit_cache(trainer: WorkbenchTrainer, config: RunConfig, data: TrainData, image_size: int) -> Any:
    """data.vit_cache: fill the frozen-ViT cache for every train and eval image (main process first,
    the other ranks then find every entry), and point the datasets at it. Returns the CacheFill."""
    from workbench.data import vit_cache

    where = f"{config.source}: data.vit_cache"
    if trainer.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED) \
            or trainer.is_fsdp_enabled:
        raise ConfigError(f"{where}: not supported under FSDP or DeepSpeed (the engine places and may shard "
                          "the ViT's weights); set data.vit_cache: false or launch without them")
    visual = trainer.accelerator.unwrap_model(trainer.model).get_base_model().transformer.visual
    trained = [name for name, p in visual.named_parameters() if p.requires_grad]
    if trained:
        raise ConfigError(f"{where}: the recipe trains transformer.visual ({trained[0]}"
                          f"{f' and {len(trained) - 1} more' if len(trained) > 1 else ''}); the cache holds the "
                          "frozen visual module's output, so set data.vit_cache: false or freeze it")
    fingerprint = vit_cache.visual_fingerprint(visual, image_size, config.mixed_precision())
    folder = vit_cache.cache_root(config.data.vit_cache_dir) / fingerprint
    paths = data.train.image_paths() + (data.eval.image_paths() if data.eval is not None else [])
    with trainer.accelerator.main_process_first():
        # The Trainer's forward runs under the accelerator's autocast: the features are computed under it too.
        fill = vit_cache.fill_cache(visual, paths, folder, fingerprint, image_size, trainer.accelerator.autocast,
                                    progress=trainer.is_world_process_zero())
    for dataset in (data.train, data.eval):
        if dataset is not None:
            dataset.vit_cache = fill.entries
    return fill


def start_summary(config: RunConfig, model: torch.nn.Module, data: TrainData, checked: Preflight,
                  processes: int) -> str:
    """What this run is about to do, printed before step 1."""
    t = config.train
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    quantised = sum(1 for m in model.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt"))
    per_step = t.batch_size * t.gradient_accumulation_steps * processes
    lines = [
        f"config:     {config.source}" + (f" (--set {' '.join(config.overrides)})" if config.overrides else ""),
        f"model:      {config.model} ({checked.model_dir}), {config.dtype}, {checked.image_size} px",
        f"recipe:     {config.recipe.name} ({config.recipe.file})",
        f"parameters: {trainable:,} trainable, {frozen:,} frozen, {quantised} quantised linears",
        f"batch:      {t.batch_size} per device x {t.gradient_accumulation_steps} accumulation x {processes} "
        f"process(es) = {per_step} samples per step; {len(data.train)} training samples",
        f"precision:  {config.mixed_precision()}; gradient checkpointing {'on' if t.gradient_checkpointing else 'off'}",
        f"output:     {t.output_dir}",
        f"resume:     {checked.resume_from or 'no (a new run)'}",
        *(f"  changed on resume: {c}" for c in checked.schedule_changes),
    ]
    if config.grpo is not None:
        g = config.grpo
        lines.append(f"grpo:       G={g.num_generations} answers per prompt, T={g.temperature}, top_p={g.top_p}, "
                     f"beta={g.beta}, eps={g.epsilon}, {g.iterations} step(s) per rollout, rewards {g.rewards}, "
                     f"from {g.init_from or 'the base'}" + (", images SHUFFLED (control)" if g.shuffle_images else ""))
    if t.eval_grounding is not None:
        lines.append(f"grounding:  Acc@0.5 every {t.evaluation_steps()} steps"
                     + (f", best by {t.metric_for_best}" if t.metric_for_best else ""))
    return "\n".join(lines)
