"""`method: dpo`: preference tuning on pairs of answers to one prompt (docs/dpo.md).

The step is workbench/train/dpo_trainer.py's (TRL's loss, workbench/train/dpo.py); this module
declares the rest: preference pairs as data (data/preference.py), one process, `dpo.init_from`,
the summary line and the run record's account of where the pairs came from.
"""

from __future__ import annotations

from typing import Any

from workbench.errors import ConfigError
from workbench.train.methods.base import Method, TrainData


class DPO(Method):
    one_process = True      # the forward runs on the unwrapped model (the prompt once for both answers)
    vit_cache = False       # the preference dataset reads pixels
    counts_tokens = False   # batches are pairs (no input_ids to count)

    def check(self, config: Any, processes: int) -> None:
        import importlib.util

        super().check(config, processes)
        if importlib.util.find_spec("trl") is None:  # the loss is TRL's (workbench/train/dpo.py)
            raise ConfigError(f"{config.source}: method: dpo needs the trl package (its DPO loss code): "
                              "pip install -c constraints.txt trl")

    def load_data(self, config: Any, tokenizer: Any, image_size: int) -> TrainData:
        from accelerate import PartialState

        from workbench.data.preference import PreferenceCollator, load_preference_data
        from workbench.data.records import find_files

        files = find_files([*config.data.train, *config.data.eval])
        seed = config.train.seed if config.dpo.shuffle_pairs else None
        data = load_preference_data(config.data, tokenizer, image_size, shuffle_seed=seed)
        if PartialState().is_main_process:
            print(data.report.summary())
        return TrainData(train=data.train, eval=data.eval, files=files, report=data.report,
                         collator=PreferenceCollator(tokenizer.pad_token_id))

    def trainer_class(self) -> type:
        from workbench.train.dpo_trainer import DPOTrainer

        return DPOTrainer

    def summary_lines(self, config: Any) -> list[str]:
        d = config.dpo
        return [f"dpo:        beta={d.beta}, loss {d.loss} (TRL), reference: the base (adapters disabled), "
                f"from {d.init_from or 'the base'}" + (", pairs SHUFFLED across prompts (control)"
                                                       if d.shuffle_pairs else "")]

    def record(self, config: Any, data: TrainData) -> dict[str, Any]:
        report = data.report
        return {**super().record(config, data), "pairs": report.pairs, "answers_cut": report.cut,
                "pairs_from": report.sources}


METHOD = DPO()
