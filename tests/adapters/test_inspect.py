"""`inspect_recipe` on the 9.6B release (meta device) and the `workbench inspect` command."""

from __future__ import annotations

import json

import yaml

from workbench.adapters.inspect import format_layers, inspect_recipe
from workbench.adapters.recipe import load_recipe
from workbench.cli.main import main

E, F = 4096, 11008


def test_official_recipe_report_and_memory(real_ref_dir):
    report = inspect_recipe(real_ref_dir, load_recipe("official-lora"))
    llm = report["components"]["llm"]
    assert (llm["adapted_modules"], llm["layers"], llm["lora_params"], llm["r"], llm["alpha"]) == (
        128, "0-31", 112_197_632, 64, 16.0)
    assert report["components"]["vit"]["adapted_modules"] == 0 and report["components"]["vit"]["lr_scale"] is None
    totals = report["totals"]
    assert totals == {"base_params": 9_656_935_168, "lora_params": 112_197_632, "trained_params": 0,
                      "trainable_params": 112_197_632, "quantized_modules": 0}
    memory = report["memory_bytes"]
    assert memory["weights"] == 19_313_870_336  # bf16 release: the index's total_size (docs/qwen-vl.md §8.1)
    assert memory["trainable"] == 112_197_632 * 16  # float32 LoRA: weight + grad + AdamW m, v
    # 4-bit column: the 160 LLM linears in NF4 + double quant (1/2 B + (1 + 4/256)/64 B per value)
    quantized = 32 * (3 * E * E + E * E + 2 * F * E + E * F)
    nf4 = quantized / 2 + quantized / 64 * (1 + 4 / 256)
    assert memory["weights_4bit"] == int(nf4 + (9_656_935_168 - quantized) * 2) == 9_702_630_912
    assert report["quantization"]["modules"] == 160 and not report["quantization"]["applied"]


def test_format_layers():
    assert format_layers([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert format_layers([]) == ""


def test_inspect_command_prints_the_table(tiny_ref_dir, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(tiny_ref_dir), "dtype": "float32", "adapter": "all-components",
        "adapter_overrides": {"vit": {"layers": "last 1"}, "modules_to_save": ["lm_head"]},
        "data": {"train": "train.jsonl"}, "train": {"output_dir": str(tmp_path / "out")}}))
    assert main(["inspect", str(config)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in lines if line.split()}
    # tiny: ViT width 32, MLP 157; LLM width 128, MLP branch 128; resampler 32 -> 128 (vocab 768)
    vit = 16 * ((32 + 96) + (32 + 32) + (32 + 157) + (157 + 32))
    assert rows["vit"][1:] == ["attn.in_proj", "attn.out_proj", "mlp.c_fc", "mlp.c_proj", "1", "4", "16/32",
                               f"{vit:,}", "0", "0", "0.5"]
    assert rows["to_save"][1:3] == ["lm_head", "-"] and rows["to_save"][-3] == f"{768 * 128:,}"
    assert any(line.startswith("GPU memory estimate: weights") for line in lines)

    assert main(["inspect", str(config), "--json", "--set", "adapter_overrides.llm.r=4"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["components"]["llm"]["lora_params"] == 2 * 4 * ((128 + 384) + (128 + 128) + 2 * (128 + 128))


def test_inspect_command_reports_config_errors(tiny_ref_dir, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(tiny_ref_dir), "adapter": "official-lora", "adapter_overrides": {"llm": {"layers": "0-5"}},
        "data": {"train": "train.jsonl"}, "train": {"output_dir": str(tmp_path / "out")}}))
    assert main(["inspect", str(config)]) == 2
    assert f"{config}: adapter_overrides.llm.layers: layer 2 is out of range" in capsys.readouterr().err
