"""Run config loading: YAML quirks, --set overrides, validation messages, the shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from workbench.errors import ConfigError
from workbench.train.config import load_run_config

REPO = Path(__file__).resolve().parents[2]
BASE = {
    "model": "some/model", "dtype": "bfloat16", "adapter": "official-lora",
    "data": {"train": "train.jsonl"},
    "train": {"output_dir": "runs/x"},
}


def write(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def with_train(**train) -> dict:
    return {**BASE, "train": {"output_dir": "runs/x", **train}}


def test_exponent_floats_and_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\nadapter: official-lora\ndata: {train: t.jsonl}\n"
                    "train:\n  output_dir: runs/x\n  lr: 1e-4\n")
    config = load_run_config(path)
    assert config.train.lr == 1e-4  # YAML 1.1 would read "1e-4" as a string
    assert config.train.schedule == "cosine" and config.train.adam_beta2 == 0.95  # official defaults
    assert config.mixed_precision() == "bf16"  # auto follows dtype
    assert config.recipe.name == "official-lora" and config.data.train == ("t.jsonl",)


def test_set_overrides_are_typed_by_yaml_and_create_keys(tmp_path):
    config = load_run_config(write(tmp_path, with_train()), [
        "train.lr=3e-5", "train.max_steps=7", "train.gradient_checkpointing=false",
        "train.save_total_limit=null", "data.train=[a.jsonl, b.jsonl]", "dtype=float32",
        "adapter_overrides.llm.r=4",
    ])
    assert config.train.lr == 3e-5 and config.train.max_steps == 7
    assert config.train.gradient_checkpointing is False and config.train.save_total_limit is None
    assert config.data.train == ("a.jsonl", "b.jsonl") and config.dtype == "float32"
    assert config.recipe.components["llm"].r == 4
    assert config.overrides[0] == "train.lr=3e-5"


@pytest.mark.parametrize("config, overrides, message", [
    (with_train(learning_rate=1e-4), [], "run.yaml: train.learning_rate: unknown key"),
    (with_train(schedul="cosine"), [], "did you mean 'schedule'?"),
    (with_train(lr="fast"), [], "train.lr: expected a number, got 'fast'"),
    (with_train(batch_size=2.5), [], "train.batch_size: expected an integer, got 2.5"),
    (with_train(gradient_checkpointing="yes"), [], "train.gradient_checkpointing: expected true or false"),
    (with_train(schedule="cosin"), [], "train.schedule: 'cosin' is not one of"),
    (with_train(batch_size=0), [], "train.batch_size: must be an integer > 0"),
    (with_train(max_steps=0), [], "train.max_steps: must be > 0 (or -1"),
    (with_train(warmup_ratio=1.5), [], "train.warmup_ratio: must be a number < 1"),
    ({**BASE, "train": {"lr": 1e-4}}, [], "train.output_dir: missing"),
    ({**BASE, "modle": "x"}, [], "run.yaml: modle: unknown key; did you mean 'model'?"),
    ({**BASE, "dtype": "bf16"}, [], "run.yaml: dtype: 'bf16' is not one of"),
    ({k: v for k, v in BASE.items() if k != "data"}, [], "run.yaml: data: missing"),
    (BASE, ["train.lr"], "--set 'train.lr': expected key=value"),
    (BASE, ["train.output_dir.x=1"], "run.yaml: train.output_dir: is not a mapping"),
    (BASE, ["train.precision=fp16"], "train.precision: fp16 autocast over bfloat16 weights"),
    # the data and adapter sections are checked by their owners, with this file's name
    ({**BASE, "data": {"train": "t.jsonl", "max_lenght": 5}}, [], "run.yaml: data.max_lenght: unknown key"),
    ({**BASE, "adapter": "offical-lora"}, [], "run.yaml: adapter: no recipe 'offical-lora'"),
])
def test_config_errors_name_the_file_and_key(tmp_path, config, overrides, message):
    with pytest.raises(ConfigError) as err:
        load_run_config(write(tmp_path, config), overrides)
    assert message in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: no such config file"):
        load_run_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_run_config(bad)


@pytest.mark.parametrize("name", ["official-lora", "qlora", "grounding", "tiny-lora"])
def test_shipped_run_configs_are_valid(name):
    config = load_run_config(REPO / "configs" / f"{name}.yaml")
    assert config.train.output_dir.startswith("runs/")


def test_official_config_has_the_official_hyper_parameters():
    t = load_run_config(REPO / "configs" / "official-lora.yaml").train
    assert (t.lr, t.schedule, t.warmup_ratio, t.weight_decay, t.adam_beta2, t.epochs) == \
        (1e-5, "cosine", 0.01, 0.1, 0.95, 5)
    assert (t.batch_size, t.gradient_accumulation_steps, t.precision, t.gradient_checkpointing) == \
        (2, 8, "bf16", True)


@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3"])
def test_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "configs" / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type.value in ("MULTI_GPU", "FSDP", "DEEPSPEED")
    if name.startswith("deepspeed"):
        assert config.deepspeed_config["zero_stage"] == int(name[-1])
