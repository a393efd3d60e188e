"""`workbench train`: a run config -> a PEFT adapter folder with its run record.

transformers' Trainer owns the loop, gradient accumulation, schedules, checkpoints, resume
(data order, optimizer, scheduler, RNG) and accelerate (DDP / FSDP / DeepSpeed). The workbench
adds only what it cannot do: the optimizer's per-component parameter groups from the recipe,
a token-weighted loss that is the same for any split of the global batch, the run guard
(NaN stop, Ctrl-C save) (workbench_trainer.py), and the run folder (record, metrics, plot, summary).
What differs between training methods (data, step, checks) is the method's (workbench/train/methods/);
this module names none of them.
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
from transformers import EarlyStoppingCallback, TrainingArguments, set_seed
from transformers.integrations import TensorBoardCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from workbench import run_folder
from workbench.atomic import write_json
from workbench.errors import ConfigError
from workbench.train import distributed, methods, record
from workbench.train.callbacks import (
    CHECKPOINTING,
    MetricsLogger,
    ProgressBar,
    RunGuard,
    SelectiveCheckpointing,
)
from workbench.train.config import RunConfig
from workbench.train.methods.base import TrainData
from workbench.train.plots import plot_loss_curve
from workbench.train.workbench_trainer import WorkbenchTrainer

__all__ = ["RunResult", "TrainData", "WorkbenchTrainer", "build_data", "build_model", "preflight", "train"]


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
        # non-reentrant: no need for inputs that require grad, works with frozen embeddings
        **{CHECKPOINTING: t.gradient_checkpointing, f"{CHECKPOINTING}_kwargs": {"use_reentrant": False}},
        logging_steps=t.logging_steps,
        logging_nan_inf_filter=False,  # a NaN must show in the logs, not be averaged away
        include_num_input_tokens_seen="non_padding" if methods.get(config.method).counts_tokens else "no",
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
    """The data engineer's pipeline, as the method reads it: every record is read and checked here,
    before any weight is loaded."""
    return methods.get(config.method).load_data(config, tokenizer, image_size)


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
    method = methods.get(config.method)
    distributed.check_launch(config)
    method.check(config, state.num_processes)  # refusals first: nothing is read or written yet
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
    method.prepare_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    run_record = None
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        for folder in run_folder.remove_incomplete_checkpoints(out):
            print(f"removed {folder}: a checkpoint save that was cut short")
        record.check_disk_space(out, trainable, _kept_checkpoints(config, data))
        run_record = record.start_run_record(out, config, trainable, data.files, checked.resume_from,
                                             processes=state.num_processes)
        run_record["method"] = method.record(config, data)
        record.write_yaml(out / run_folder.RESOLVED_CONFIG_NAME, config.to_dict())
        write_json(out / run_folder.RECORD_NAME, run_record)
        print(start_summary(config, model, data, checked, state.num_processes))

    guard = RunGuard()
    extra = [EarlyStoppingCallback(config.train.early_stopping_patience)] if config.train.early_stopping_patience else []
    trainer = method.trainer_class()(
        model=model, args=training_arguments(config, has_eval=data.eval is not None),
        **method.trainer_kwargs(checked.tokenizer),
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
    lines += methods.get(config.method).summary_lines(config)
    if t.eval_grounding is not None:
        lines.append(f"grounding:  Acc@0.5 every {t.evaluation_steps()} steps"
                     + (f", best by {t.metric_for_best}" if t.metric_for_best else ""))
    return "\n".join(lines)
