"""What a training method declares (`Method`), and what methods share: `TrainData` and
`init_from_run` (continue an SFT run's adapter)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from workbench.errors import ConfigError

if TYPE_CHECKING:
    from workbench.train.config import RunConfig


@dataclass
class TrainData:
    train: Any
    eval: Any | None
    collator: Any
    files: list[Path]  # the data files, for the run record's fingerprint
    report: Any = None  # what the loader found (counts), for the method's record


class Method:
    """A training method. The defaults are SFT's; a method overrides what it does differently.

    Order in `workbench.train.trainer.train`: `check` (before the data, the weights or the run
    folder are touched), `load_data`, the model is built, `prepare_model`, the run folder is
    written (with `summary_lines` and `record`), `trainer_class(**trainer_kwargs)` trains.
    """

    one_process = False       # refused under a multi-process launch
    vit_cache = True          # can read the frozen-ViT cache (data.vit_cache)
    counts_tokens = True      # batches hold input_ids the Trainer can count (tokens/s)

    def section(self, config: RunConfig) -> Any:
        """The method's own config section (the key of the same name), or None."""
        return getattr(config, config.method, None)

    def init_from(self, config: RunConfig) -> str | None:
        """An SFT run folder whose adapter this run continues (`<section>.init_from`), or None."""
        return getattr(self.section(config), "init_from", None)

    def check(self, config: RunConfig, processes: int) -> None:
        """Refusals that need neither weights nor data; they run before anything is read or written."""
        where = f"{config.source}: method: {config.method}"
        if self.one_process and processes > 1:
            raise ConfigError(f"{where} runs in one process (no DDP/FSDP yet); this launch has {processes}: "
                              "run `workbench train` without accelerate launch (or with --num_processes 1)")
        if config.data.vit_cache and not self.vit_cache:
            raise ConfigError(f"{config.source}: data.vit_cache: not supported with method: {config.method}; "
                              "set data.vit_cache: false")
        folder = self.init_from(config)
        if folder is not None:
            check_init_from(folder, f"{config.source}: {config.method}.init_from")

    def load_data(self, config: RunConfig, tokenizer: Any, image_size: int) -> TrainData:
        from accelerate import PartialState

        from workbench.data.collator import SFTCollator
        from workbench.data.dataset import load_sft_data
        from workbench.data.records import find_files

        files = find_files([*config.data.train, *config.data.eval])
        data = load_sft_data(config.data, tokenizer, image_size=image_size)
        if PartialState().is_main_process:
            print(data.report.summary())
        return TrainData(train=data.train, eval=data.eval, files=files,
                         collator=SFTCollator(tokenizer.pad_token_id, config.data.pad_to_multiple_of))

    def prepare_model(self, model: torch.nn.Module, config: RunConfig) -> None:
        """After the adapters are built, before training: load `init_from`'s adapter."""
        folder = self.init_from(config)
        if folder is not None:
            init_from_run(model, folder, f"{config.source}: {config.method}.init_from")

    def trainer_class(self) -> type:
        from workbench.train.workbench_trainer import WorkbenchTrainer

        return WorkbenchTrainer

    def trainer_kwargs(self, tokenizer: Any) -> dict[str, Any]:
        return {}

    def summary_lines(self, config: RunConfig) -> list[str]:
        """Lines of the start summary (`name:       what it will do`)."""
        return []

    def record(self, config: RunConfig, data: TrainData) -> dict[str, Any]:
        """The run record's `method` entry (the resolved section is in `config` already)."""
        return {"name": config.method, "init_from": self.init_from(config)}


def check_init_from(folder: str, where: str) -> None:
    from workbench.adapters.apply import WEIGHTS_FILE

    if not (Path(folder) / WEIGHTS_FILE).is_file():
        raise ConfigError(f"{where}: {folder} holds no {WEIGHTS_FILE} (an SFT run folder)")


def init_from_run(model: torch.nn.Module, folder: str, where: str) -> None:
    """Load the adapter of an SFT run folder into the freshly built PeftModel (same recipe)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from workbench.adapters.apply import WEIGHTS_FILE

    check_init_from(folder, where)
    state = load_file(Path(folder) / WEIGHTS_FILE)
    result = set_peft_model_state_dict(model, state)
    # fully trained parameters (`train:` in the recipe) are stored under their plain names
    plain = {k: v for k, v in state.items() if ".lora_" not in k}
    own = dict(model.named_parameters())
    unknown = [k for k in result.unexpected_keys if k not in plain or k not in own]
    with torch.no_grad():
        for k, v in plain.items():
            if k in own:
                own[k].copy_(v)
    if unknown:
        raise ConfigError(f"{where}: {folder}'s adapter does not fit this run's recipe "
                          f"(e.g. {unknown[0]}); use the recipe the SFT run used")
