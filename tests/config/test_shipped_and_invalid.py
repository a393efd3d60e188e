"""Every shipped config and recipe through validation and `inspect` on the release config, and one
invalid YAML per validation rule with its message (the table style of peft's TEST_CASES)."""

from __future__ import annotations

from pathlib import Path

import pytest

from workbench.adapters.inspect import inspect_recipe
from workbench.adapters.recipe import available_recipes, load_recipe
from workbench.errors import ConfigError
from workbench.model.checkpoint import RELEASES_DIR
from workbench.train.config import load_run_config

REPO = Path(__file__).resolve().parents[2]
RELEASE = RELEASES_DIR / "Qwen--Qwen-VL-Chat"  # the real release's config.json, shipped as package data
RELEASE_PARAMS = 9_656_935_168  # the release's parameter count (its index: 19,313,870,336 bf16 bytes)

# recipe -> (LoRA parameters, fully trained parameters) on the release, as README's recipe table says.
# Hand checks: official LoRA = 32 layers x 64 x (4096+12288 + 4096+4096 + 2 x (4096+11008)) = 112,197,632;
# the resampler's queries + ln_q + ln_kv = 256*4096 + 4*4096 = 1,064,960.
RECIPES = {
    "official-lora": (112_197_632, 0),
    "qlora": (112_197_632, 0),
    "llm-resampler": (114_139_136, 1_064_960),
    "all-components": (117_940_224, 1_064_960),
    "grounding": (144_101_376, 1_064_960),
    "stage1": (0, 1_934_562_048),
    "stage2": (112_197_632, 1_934_562_048),
    "stage3": (112_197_632, 91_791_360),
    "demo": None,  # made for the tiny demo model; on the release it must still resolve
}
CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))


def test_every_shipped_recipe_is_in_the_table():
    assert sorted(RECIPES) == available_recipes()


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_shipped_recipe_inspects_on_the_release(name):
    report = inspect_recipe(RELEASE, load_recipe(name))
    totals = report["totals"]
    assert totals["base_params"] == RELEASE_PARAMS
    if RECIPES[name] is not None:
        assert (totals["lora_params"], totals["trained_params"]) == RECIPES[name]
    assert totals["trainable_params"] > 0


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_run_config_validates_and_inspects_on_the_release(name):
    config = load_run_config(REPO / "configs" / name)
    report = inspect_recipe(RELEASE, config.recipe, config.dtype)
    assert report["recipe"] == config.recipe.name and report["totals"]["base_params"] == RELEASE_PARAMS
    assert config.to_dict()["train"]["output_dir"] == config.train.output_dir


def test_inspect_cli_offline_uses_the_shipped_release_config(monkeypatch, capsys):
    from huggingface_hub import constants

    from workbench.cli.main import main

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["inspect", str(REPO / "configs" / "official-lora.yaml")]) == 0
    out = capsys.readouterr().out
    assert "shipped with the workbench" in out and "trainable parameters: 112,197,632" in out


RUN = """\
model: m
adapter: {adapter}
data:
  train: t.jsonl
{data}train:
  output_dir: runs/x
{train}{top}"""
RECIPE = """\
llm:
  modules: [c_attn]
{llm}{top}"""

# (what is wrong, where: run | recipe, the YAML pieces, the message)
INVALID = [
    ("duplicate top-level key", "run", {"top": "dtype: float32\ndtype: bfloat16\n"},
     "not valid YAML: key 'dtype' given twice (first on line 7) (line 8, column 1)"),
    ("duplicate train key", "run", {"train": "  lr: 1e-4\n  lr: 2e-4\n"}, "key 'lr' given twice"),
    ("duplicate data key", "run", {"data": "  packing: true\n  packing: false\n"}, "key 'packing' given twice"),
    ("NaN learning rate", "run", {"train": "  lr: .nan\n"}, "run.yaml: train.lr: must be a finite number, got nan"),
    ("inf grad norm", "run", {"train": "  max_grad_norm: .inf\n"}, "train.max_grad_norm: must be a finite number"),
    ("NaN eval fraction", "run", {"data": "  eval_fraction: .nan\n"}, "data.eval_fraction: must be a finite number"),
    ("out of range", "run", {"train": "  warmup_ratio: 1.5\n"}, "train.warmup_ratio: must be a number < 1, got 1.5"),
    ("out of range int", "run", {"data": "  max_length: 0\n"}, "data.max_length: must be an integer >= 1, got 0"),
    ("out of range top", "run", {"top": "image_size: -4\n"}, "run.yaml: image_size: must be an integer > 0, got -4"),
    ("unknown key", "run", {"train": "  shedule: cosine\n"}, "train.shedule: unknown key; did you mean 'schedule'?"),
    ("unknown data key", "run", {"data": "  max_lenght: 9\n"}, "data.max_lenght: unknown key; did you mean 'max_length'?"),
    ("unknown top key", "run", {"top": "modle: x\n"}, "run.yaml: modle: unknown key; did you mean 'model'?"),
    # names from transformers, PEFT and the other tuning tools point at the workbench's key
    ("transformers lr", "run", {"train": "  learning_rate: 1e-4\n"}, "train.learning_rate: unknown key; did you mean 'lr'?"),
    ("transformers batch", "run", {"train": "  per_device_train_batch_size: 4\n"},
     "train.per_device_train_batch_size: unknown key; did you mean 'batch_size'?"),
    ("transformers epochs", "run", {"train": "  num_train_epochs: 3\n"}, "train.num_train_epochs: unknown key; did you mean 'epochs'?"),
    ("peft rank in train", "run", {"train": "  lora_r: 16\n"}, "train.lora_r: unknown key; did you mean 'adapter_overrides.llm.r'?"),
    ("peft alpha on top", "run", {"top": "lora_alpha: 32\n"}, "run.yaml: lora_alpha: unknown key; did you mean 'adapter_overrides.llm.alpha'?"),
    ("lora_target on top", "run", {"top": "lora_target: [c_attn]\n"},
     "run.yaml: lora_target: unknown key; did you mean 'adapter_overrides.llm.modules'?"),
    ("top-level learning_rate", "run", {"top": "learning_rate: 1e-4\n"}, "run.yaml: learning_rate: unknown key; did you mean 'train.lr'?"),
    ("model_max_length in data", "run", {"data": "  model_max_length: 2048\n"},
     "data.model_max_length: unknown key; did you mean 'max_length'?"),
    ("recipe lora_target", "recipe", {"llm": "  lora_target: [c_attn]\n"}, "recipe.yaml: llm.lora_target: unknown key; did you mean 'modules'?"),
    ("wrong type", "run", {"train": "  batch_size: two\n"}, "train.batch_size: expected an integer, got 'two'"),
    ("wrong type bool", "run", {"data": "  packing: yes please\n"}, "data.packing: expected true or false"),
    ("wrong type mapping", "run", {"top": "adapter_overrides: [1]\n"}, "adapter_overrides: expected a mapping"),
    ("bad choice", "run", {"train": "  schedule: cosin\n"},
     "train.schedule: 'cosin' is not one of cosine, linear, constant, constant_with_warmup, cosine_with_min_lr; "
     "did you mean 'cosine'?"),
    ("bad dtype choice", "run", {"top": "dtype: bf16\n"}, "run.yaml: dtype: 'bf16' is not one of bfloat16, float16"),
    ("bad data choice", "run", {"data": "  overflow: cut\n"}, "data.overflow: 'cut' is not one of truncate, drop"),
    ("recipe duplicate key", "recipe", {"llm": "  r: 8\n  r: 16\n"}, "recipe.yaml: not valid YAML: key 'r' given twice"),
    ("recipe NaN", "recipe", {"llm": "  alpha: .nan\n"}, "recipe.yaml: llm.alpha: must be a finite number, got nan"),
    ("recipe out of range", "recipe", {"llm": "  dropout: 1.0\n"}, "recipe.yaml: llm.dropout: must be a number < 1"),
    ("recipe unknown key", "recipe", {"llm": "  lora_alpha: 16\n"}, "recipe.yaml: llm.lora_alpha: unknown key; did you mean 'alpha'?"),
    ("recipe wrong type", "recipe", {"llm": "  r: '8'\n"}, "recipe.yaml: llm.r: expected an integer, got '8'"),
    ("recipe bad choice", "recipe", {"top": "quantization: {quant_type: nf5}\n"},
     "recipe.yaml: quantization.quant_type: 'nf5' is not one of nf4, fp4; did you mean 'nf4'?"),
    ("recipe bad list item", "recipe", {"top": "quantization: {components: [llmm]}\n"},
     "quantization.components: 'llmm' is not one of vit, resampler, llm, lm_head; did you mean 'llm'?"),
]


@pytest.mark.parametrize("rule, where, pieces, message", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_yaml_is_refused_with_its_message(tmp_path, rule, where, pieces, message):
    adapter = "official-lora"
    if where == "recipe":
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(RECIPE.format(**{"llm": "", "top": "", **pieces}))
        adapter, pieces = str(recipe), {}
    run = tmp_path / "run.yaml"
    run.write_text(RUN.format(adapter=adapter, **{"data": "", "train": "", "top": "", **pieces}))
    with pytest.raises(ConfigError) as err:
        load_run_config(run)
    text = str(err.value)
    assert message in text, text
    assert text.startswith(str(tmp_path)), "the message names the file"
    assert "\n" not in text, "one line"


def test_every_alias_names_a_real_key():
    """Each alias points at a field of its own section or at a dotted key from the top of the file."""
    from dataclasses import fields

    from workbench.adapters.recipe import Component
    from workbench.data.config import DataConfig
    from workbench.train.config import RunFile, TrainConfig

    sections = {"train": TrainConfig, "data": DataConfig, "adapter_overrides.llm": Component}
    for cls in (RunFile, TrainConfig, DataConfig, Component):
        own = {f.name for f in fields(cls)}
        for alias, target in cls.ALIASES.items():
            section, _, key = target.rpartition(".")
            names = {f.name for f in fields(sections[section])} if section else own
            assert key in names and alias not in own, (cls.__name__, alias, target)
