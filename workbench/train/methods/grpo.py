"""`method: grpo`: group-relative policy optimisation on grounding queries (docs/grpo.md).

The step is workbench/train/grpo_trainer.py's; this module declares the rest: grounding queries
as data (the rollout builds the tensors), one process, `grpo.init_from`, the summary line.
"""

from __future__ import annotations

from typing import Any

from workbench.train.methods.base import Method, TrainData


class GRPO(Method):
    one_process = True      # the rollout calls the unwrapped model's generate
    vit_cache = False       # the rollout samples from pixels
    counts_tokens = False   # batches are queries (no input_ids to count)

    def load_data(self, config: Any, tokenizer: Any, image_size: int) -> TrainData:
        from accelerate import PartialState

        from workbench.data.records import find_files
        from workbench.train.grpo_trainer import QueryCollator, load_grpo_queries

        files = find_files([*config.data.train, *config.data.eval])
        queries = load_grpo_queries(config)
        if PartialState().is_main_process:
            print(f"grpo: {len(queries)} grounding queries in {', '.join(config.data.train)}")
        return TrainData(train=queries, eval=None, files=files, collator=QueryCollator(image_size))

    def trainer_class(self) -> type:
        from workbench.train.grpo_trainer import GRPOTrainer

        return GRPOTrainer

    def trainer_kwargs(self, tokenizer: Any) -> dict[str, Any]:
        return {"tokenizer": tokenizer}

    def summary_lines(self, config: Any) -> list[str]:
        g = config.grpo
        return [f"grpo:       G={g.num_generations} answers per prompt, T={g.temperature}, top_p={g.top_p}, "
                f"beta={g.beta}, eps={g.epsilon}, {g.iterations} step(s) per rollout, rewards {g.rewards}, "
                f"from {g.init_from or 'the base'}" + (", images SHUFFLED (control)" if g.shuffle_images else "")]


METHOD = GRPO()
