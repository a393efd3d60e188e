"""Fixtures for the training tests: a tiny model, a small synthetic dataset, recipes, run configs.

The data is easy to learn on purpose (every answer is the same sentence), so "the loss falls
by more than half" is a quick test of the whole pipeline, not of the model's capacity.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

LLM_LORA = {"modules": ["c_attn", "attn.c_proj", "w1", "w2"], "r": 8, "alpha": 16}
RECIPES = {
    "lora": {"llm": LLM_LORA},
    "qlora": {"llm": LLM_LORA, "quantization": {"bits": 4, "quant_type": "nf4", "compute_dtype": "float32"}},
    # All three components, plus a parameter trained in place (saved beside the LoRA weights).
    "all3": {
        "vit": {"modules": ["attn.in_proj", "attn.out_proj", "mlp.c_fc", "mlp.c_proj"], "r": 4, "alpha": 8},
        "resampler": {"modules": ["kv_proj"], "r": 4, "alpha": 8, "train": ["query"], "lr_scale": 0.5},
        "llm": LLM_LORA,
    },
}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from workbench.demo.tiny import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train.jsonl (16 records, every fourth with an image) and eval.jsonl (4 records)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("toy-data")
    (root / "img").mkdir()
    colours = ["red", "green", "blue", "white"]
    for i, colour in enumerate(colours):
        Image.new("RGB", (40 + 8 * i, 32), colour).save(root / "img" / f"{colour}.png")

    def records(n: int, offset: int) -> list[dict]:
        out = []
        for i in range(offset, offset + n):
            if i % 4 == 0:
                colour = colours[(i // 4) % 4]
                out.append({"images": [f"img/{colour}.png"],
                            "messages": [{"role": "user", "content": f"<image>Describe picture {i}."},
                                         {"role": "assistant", "content": "A plain square of one colour."}]})
            else:
                out.append({"messages": [{"role": "user", "content": f"Question number {i}?"},
                                         {"role": "assistant", "content": "The answer is always the same."}]})
        return out

    for name, rows in (("train.jsonl", records(16, 0)), ("eval.jsonl", records(4, 100))):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def write_recipe(folder: Path, name: str) -> Path:
    path = folder / f"recipe-{name}.yaml"
    path.write_text(yaml.safe_dump(RECIPES[name]))
    return path


@pytest.fixture
def run_config(tmp_path: Path, tiny_model: Path, toy_data: Path):
    """`run_config(recipe, folder=tmp_path, eval_data=False, **train)` -> a run config path."""

    def make(recipe: str = "lora", folder: Path | None = None, eval_data: bool = False, **train: object) -> Path:
        return write_run_config(folder or tmp_path, tiny_model, toy_data, recipe, eval_data=eval_data, **train)
    return make


def write_run_config(folder: Path, model: Path, data: Path, recipe: str, *, eval_data: bool, **train: object) -> Path:
    """A run config for the tiny model in float32 on CPU; `train` entries override the defaults here."""
    folder.mkdir(parents=True, exist_ok=True)
    settings = {
        "output_dir": str(folder / "run"), "lr": 5e-3, "schedule": "constant", "warmup_ratio": 0.0,
        "weight_decay": 0.0, "max_steps": 30, "batch_size": 4, "gradient_accumulation_steps": 1,
        "gradient_checkpointing": False, "loss_chunk_size": 64, "save_steps": 10, "logging_steps": 1,
        "seed": 1, "report_to": "none",
    }
    settings.update(train)
    config = {
        "model": str(model), "dtype": "float32", "adapter": str(write_recipe(folder, recipe)),
        "data": {"train": str(data / "train.jsonl"), "max_length": 384, "num_workers": 0,
                 **({"eval": str(data / "eval.jsonl")} if eval_data else {})},
        "train": settings,
    }
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
