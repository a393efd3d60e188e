"""The Qwen-VL paper's three training stages: configs/stage{1,2,3}.yaml and adapters/stage{1,2,3}.yaml.

Every test runs the shipped configs on the tiny model with only the model, the data, the float32
numerics and the run length overridden (`--set`, as a user would), so the recipes, `image_size`
and the optimiser settings are the shipped ones. The tiny model's own size is 56 px, but its ViT
is 32 wide, so the stages' real 224 px (16x16 grid: the position table as it is) and 448 px
(32x32: the table resized, docs/qwen-vl.md §4.3) are cheap and are what is tested.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO
from workbench.adapters.inspect import meta_model
from workbench.adapters.recipe import load_recipe
from workbench.adapters.targets import FIXED, component_of, resolve_targets
from workbench.errors import ConfigError
from workbench.train.config import load_run_config

STAGES = ("stage1", "stage2", "stage3")
# What each stage trains, per component: "full" (every parameter), "lora" or "frozen".
EXPECTED = {
    "stage1": {"vit": "full", "resampler": "full", "llm": "frozen"},
    "stage2": {"vit": "full", "resampler": "full", "llm": "lora"},
    "stage3": {"vit": "frozen", "resampler": "full", "llm": "lora"},
}
IMAGE_SIZE = {"stage1": 224, "stage2": 448, "stage3": 448}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from workbench.demo.tiny import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from workbench.demo.synthetic import make_shapes_dataset

    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), 3, size_range=(56, 80))


def config_path(stage: str) -> str:
    return str(REPO / "configs" / f"{stage}.yaml")


def tiny_overrides(model: Path, data: Path, out: Path) -> list[str]:
    """--set arguments that put a shipped stage config on the tiny model for two CPU steps."""
    sets = {"model": model, "dtype": "float32", "train.precision": "fp32", "train.output_dir": out,
            # stage 3 ships finetune.py's chat format; the shapes set is in the structured one
            "data.train": data, "data.format": "structured", "data.label_mode": "assistant",
            "data.num_workers": 0, "train.max_steps": 2, "train.batch_size": 2,
            "train.gradient_accumulation_steps": 1, "train.logging_steps": 1, "train.report_to": "none"}
    return [f"{key}={value}" for key, value in sets.items()]


def component_sizes(model: torch.nn.Module) -> dict[str, int]:
    """Parameters per component that full training covers (all but the fixed sin-cos table)."""
    sizes = dict.fromkeys(EXPECTED["stage1"], 0)
    for name, param in model.named_parameters():
        if name not in FIXED:
            sizes[component_of(name)] += param.numel()
    return sizes


@pytest.mark.parametrize("stage", STAGES)
def test_inspect_shows_the_trainable_parts_of_each_stage(stage, tiny_model, capsys):
    from workbench.cli.main import main

    assert main(["inspect", config_path(stage), "--json", "--set", f"model={tiny_model}"]) == 0
    report = json.loads(capsys.readouterr().out)
    sizes = component_sizes(meta_model(tiny_model))
    for comp, kind in EXPECTED[stage].items():
        got = report["components"][comp]
        assert got["trained_params"] == (sizes[comp] if kind == "full" else 0), (comp, got)
        # the official LLM LoRA: 4 linears in each of the 2 tiny layers
        assert got["adapted_modules"] == (8 if kind == "lora" else 0), (comp, got)
        assert (got["lora_params"] > 0) == (kind == "lora"), (comp, got)
        assert (got["lr_scale"] is None) == (kind == "frozen"), (comp, got)
    assert report["modules_to_save"]["modules"] == [] and report["quantization"]["applied"] is False


def test_train_all_is_the_whole_component_within_layers(tiny_model, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("vit: {train: [all], layers: [1]}\nresampler: {train: [all]}\n")
    targets = resolve_targets(meta_model(tiny_model), load_recipe(str(recipe))).components
    names = [n for n, _ in meta_model(tiny_model).named_parameters()]
    vit = [n for n in names if component_of(n) == "vit" and ".resblocks.0." not in n]
    assert targets["vit"].train == vit and "transformer.visual.conv1.weight" in vit
    assert targets["resampler"].train == [n for n in names if component_of(n) == "resampler" and n not in FIXED]
    assert "transformer.visual.proj" in targets["resampler"].train
    assert targets["llm"].train == [] and all(not c.modules for c in targets.values())


def test_image_size_is_checked(tiny_model, tmp_path):
    from workbench.train.trainer import build_model

    with pytest.raises(ConfigError, match=r"stage1\.yaml: image_size: expected an integer, got .big."):
        load_run_config(config_path("stage1"), ["image_size=big"])
    config = load_run_config(config_path("stage1"), [*tiny_overrides(tiny_model, tmp_path, tmp_path),
                                                      "image_size=100"])
    with pytest.raises(ConfigError, match=r"stage1\.yaml: image_size: 100 is not a multiple of the patch "
                                          r"size 14; try 98"):
        build_model(config, torch.device("cpu"))


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_image_size_reaches_the_data_and_the_vit(stage, tiny_model, shapes, tmp_path):
    from workbench.train.trainer import build_data, build_model, preflight

    config = load_run_config(config_path(stage), tiny_overrides(tiny_model, shapes, tmp_path))
    model = build_model(config, torch.device("cpu"))
    checked = preflight(config, resume=False)
    data = build_data(config, checked.tokenizer, checked.image_size)
    pixels = data.collator([data.train[0]])["pixel_values"]
    size = IMAGE_SIZE[stage]
    assert pixels.shape == (1, 3, size, size)
    visual = model.base_model.model.transformer.visual
    assert visual.image_size == size  # what the model's own image reading (paths in <img>) uses
    with torch.no_grad():
        assert visual.patch_features(pixels).shape[1] == (size // 14) ** 2  # 256 at 224, 1024 at 448
        assert visual(pixels).shape[1] == 256  # the resampler still gives 256 image tokens


def adapter_parts(run: Path) -> set[tuple[str, str]]:
    """{(component, "lora" | "full")} of the tensors in a run's adapter file."""
    keys = load_file(run / "adapter_model.safetensors")
    return {(component_of(k), "lora" if ".lora_" in k else "full") for k in keys}


@pytest.mark.slow
def test_the_three_stages_train_in_a_chain(tiny_model, shapes, tmp_path, capsys):
    """stage 1 on the base, merged; stage 2 on that at 448 px, merged; stage 3 on that."""
    from workbench.cli.main import main
    from workbench.merge.merge import merge_adapter

    base = tiny_model
    for stage in STAGES:
        run = tmp_path / stage
        sets = [arg for item in tiny_overrides(base, shapes, run) for arg in ("--set", item)]
        assert main(["train", config_path(stage), *sets]) == 0, stage
        assert "completed: step 2" in capsys.readouterr().out, stage
        assert load_run_config(run / "config.resolved.yaml").image_size == IMAGE_SIZE[stage]
        expected = {(c, kind) for c, kind in EXPECTED[stage].items() if kind != "frozen"}
        assert adapter_parts(run) == expected, stage

        merged = tmp_path / f"{stage}-merged"
        report = merge_adapter(base, run, merged, verify=True)  # base + adapter through PEFT == merged
        assert report["verify"]["passed"], stage
        trained = {k.removeprefix("base_model.model."): v for k, v in load_file(run / "adapter_model.safetensors")
                   .items() if ".lora_" not in k}
        before, after = load_file(base / "model.safetensors"), load_file(merged / "model.safetensors")
        assert all(torch.equal(after[k], v) for k, v in trained.items()), stage
        assert any(not torch.equal(before[k], v) for k, v in trained.items()), f"{stage}: nothing learned"
        # the merged model keeps its base's config: the training resolution lives in the run record
        assert json.loads((merged / "config.json").read_text())["visual"]["image_size"] == 56
        base = merged
