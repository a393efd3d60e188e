"""`inspect_recipe` on the 9.6B release (meta device) and the `workbench inspect` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from workbench.adapters.inspect import format_layers, inspect_recipe
from workbench.adapters.recipe import load_recipe
from workbench.cli.main import main

E, F = 4096, 11008
REPO = Path(__file__).resolve().parents[2]


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


def test_per_device_memory_under_sharding_is_the_hand_computation(real_ref_dir):
    # official-lora on the 9.6B release, bf16, 8 devices. Units as configs/accelerate/fsdp.yaml makes them.
    report = inspect_recipe(real_ref_dir, load_recipe("official-lora"), devices=8)
    V, W, M = 151_936, 1664, 8192  # vocab; ViT width and MLP width (mlp_ratio 4.9231)
    lora_per_block = 112_197_632 // 32
    # QWenBlock: ln_1, ln_2 (E each), c_attn (3E x E + 3E bias), attn.c_proj (E x E), w1, w2 (F x E), mlp.c_proj (E x F),
    # in bf16, plus its LoRA in float32 with float32 gradients (gathered unsharded for the reduce-scatter).
    block = 2 * (2 * E + 3 * E * E + 3 * E + E * E + 3 * E * F) + lora_per_block * (4 + 4)
    # VisualAttentionBlock: ln_1, ln_2 (weight + bias), in_proj (3W x W + 3W), out_proj, c_fc, c_proj
    vit_block = 2 * (4 * W + 3 * W * W + 3 * W + W * W + W + W * M + M + M * W + W)
    wte, tail = 2 * V * E, 2 * (V * E + E)  # tail: lm_head + ln_f
    # root, everything else: ViT conv1, 16x16 position table, ln_pre; resampler query, kv_proj, attention
    # (in_proj, out_proj), ln_q, ln_kv, pos_embed; ln_post, proj
    root = 2 * (W * 3 * 14 * 14 + 256 * W + 2 * W
                + 256 * E + W * E + 3 * E * E + 3 * E + E * E + E + 4 * E + 256 * E
                + 2 * E + E * E)
    weights = report["memory_bytes"]["weights"]
    assert root + 32 * (block - lora_per_block * 8) + 48 * vit_block + wte + tail == weights  # every tensor once
    total = weights + 112_197_632 * 16
    expected = {"devices": 8, "divided": -(-total // 8), "gathered": root + tail + 2 * block}
    expected["per_device"] = expected["divided"] + expected["gathered"]  # 4.60 GiB, of 19.66 GiB on one device
    got = report["memory_per_device"]
    assert {k: got[k] for k in expected} == expected

    one = inspect_recipe(real_ref_dir, load_recipe("official-lora"), devices=1)["memory_per_device"]
    assert one["per_device"] == total and one["gathered"] == 0


def test_fsdp_config_wraps_the_units_the_estimate_assumes():
    from workbench.adapters.sharded_memory import WRAP_CLASSES

    config = yaml.safe_load((REPO / "configs" / "accelerate" / "fsdp.yaml").read_text())
    assert tuple(config["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"].split(",")) == WRAP_CLASSES


def test_inspect_command_prints_per_device_memory(tiny_ref_dir, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(tiny_ref_dir), "dtype": "float32", "adapter": "official-lora",
        "data": {"train": "train.jsonl"}, "train": {"output_dir": str(tmp_path / "out")}}))
    assert main(["inspect", str(config), "--devices", "4"]) == 0
    assert "sharded over 4 devices (FSDP / ZeRO-3):" in capsys.readouterr().out
    assert main(["inspect", str(config), "--devices", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    d, m = report["memory_per_device"], report["memory_bytes"]
    assert d["divided"] == -(-m["total"] // 4) and d["per_device"] == d["divided"] + d["gathered"]
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", str(config), "--devices", "0"])
    assert exit_info.value.code == 2 and "argument --devices: expected a whole number >= 1, not '0'" in capsys.readouterr().err
