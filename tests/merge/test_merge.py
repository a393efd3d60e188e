"""End to end on the tiny model: merged logits == adapter-model logits, release layout, dtypes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from workbench import load_model
from workbench.errors import CheckpointError
from workbench.merge import merge_adapter
from workbench.merge.verify import adapter_logits, merged_logits, probe_batch
from workbench.model import checkpoint


@pytest.fixture(scope="module")
def batch(tiny_base):
    return probe_batch(tiny_base, 56)


def _merged_keys(report: dict) -> set[str]:
    return {m["key"] for m in report["merged_modules"]}


@pytest.mark.parametrize("name, expect", [
    ("llm", {"transformer.h.1.mlp.c_proj.weight", "transformer.h.0.attn.c_attn.weight"}),
    ("vit", {"transformer.visual.transformer.resblocks.0.attn.in_proj.weight"}),
    ("resampler", {"transformer.visual.attn_pool.kv_proj.weight", "transformer.visual.attn_pool.attn.in_proj_weight",
                   "transformer.visual.attn_pool.attn.out_proj.weight"}),
    ("all", {"transformer.h.0.mlp.w1.weight", "transformer.visual.transformer.resblocks.1.mlp.c_fc.weight",
             "transformer.visual.attn_pool.attn.out_proj.weight"}),
    ("dora", {"transformer.h.1.mlp.w2.weight"}),
    ("qlora", {"transformer.h.0.attn.c_attn.weight"}),
])
def test_merged_logits_equal_adapter_model(name, expect, adapters, tiny_base, batch, tmp_path):
    adapter = adapters(name)
    report = merge_adapter(tiny_base, adapter, tmp_path / "out")
    assert expect <= _merged_keys(report)
    # Reference: the adapter applied by PEFT on the unquantised fp32 base (also for the QLoRA adapter).
    reference = adapter_logits(tiny_base, adapter, batch, torch.float32, "cpu")
    base = merged_logits(tiny_base, batch, torch.float32, "cpu")
    merged = merged_logits(tmp_path / "out", batch, torch.float32, "cpu")
    assert (reference - base).abs().max() > 1e-2  # the adapter really changes the model
    assert (merged - reference).abs().max() <= 1e-5
    assert report["qlora"] == (name == "qlora")


def test_trained_params_and_modules_to_save_are_written(adapters, tiny_base, tmp_path):
    adapter = adapters("all")
    report = merge_adapter(tiny_base, adapter, tmp_path / "out")
    assert report["trained_params_written"] == sorted([
        "lm_head.weight", "transformer.ln_f.weight", "transformer.visual.attn_pool.query",
        "transformer.visual.attn_pool.ln_q.weight", "transformer.visual.attn_pool.ln_q.bias",
        "transformer.visual.attn_pool.ln_kv.weight", "transformer.visual.attn_pool.ln_kv.bias",
        "transformer.visual.ln_pre.weight", "transformer.visual.ln_pre.bias"])
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        saved = f.get_tensor("base_model.model.transformer.visual.attn_pool.query")
    merged = load_model(tmp_path / "out").state_dict()["transformer.visual.attn_pool.query"]
    assert torch.equal(merged, saved)


def _raw(model_dir, key):
    path = checkpoint.weight_map(model_dir)[key]
    with safe_open(path, "pt") as f:
        return f.get_tensor(key)


def test_release_layout_names_index_and_untouched_bytes(adapters, tiny_base, tmp_path):
    out = tmp_path / "out"
    report = merge_adapter(tiny_base, adapters("all"), out, max_shard_size="300KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    base_keys = set(checkpoint.weight_map(tiny_base))
    assert set(index["weight_map"]) == base_keys
    assert len(set(index["weight_map"].values())) > 3  # really sharded
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in load_model(out).state_dict().values())
    copied = {p.name for p in tiny_base.iterdir()} - {"model.safetensors"}
    assert copied <= {p.name for p in out.iterdir()}
    assert (out / "config.json").read_bytes() == (tiny_base / "config.json").read_bytes()
    touched = _merged_keys(report) | set(report["trained_params_written"])
    for key in base_keys:
        before, after = _raw(tiny_base, key), _raw(out, key)
        assert after.dtype == before.dtype == torch.float32
        same = torch.equal(before.view(torch.uint8), after.view(torch.uint8))
        assert same == (key not in touched), key
    model = load_model(out)
    assert {n for n, _ in model.named_parameters()} <= base_keys


def test_dtype_option_casts_and_updates_config(adapters, tiny_base, batch, tmp_path):
    out = tmp_path / "out"
    merge_adapter(tiny_base, adapters("llm"), out, dtype=torch.bfloat16)
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    assert (config["bf16"], config["fp16"], config["fp32"]) == (True, False, False)  # tiny base forced fp32
    assert {_raw(out, k).dtype for k in checkpoint.weight_map(out)} == {torch.bfloat16}
    assert load_model(out).dtype == torch.bfloat16
    report = json.loads((out / "merge_report.json").read_text())
    assert report["dtype"] == "bfloat16"
    assert report["base_fingerprint"] == checkpoint.fingerprint(tiny_base)


def test_official_finetune_adapter_and_gptq_int4_base(tiny_base, batch, tmp_path):
    """finetune.py's LoraConfig, saved with PEFT's save_pretrained, no run record; Q-LoRA names Int4."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_model(tiny_base), LoraConfig(
        r=64, lora_alpha=16, lora_dropout=0.05, target_modules=["c_attn", "attn.c_proj", "w1", "w2"],
        bias="none", task_type="CAUSAL_LM", init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    config_file = tmp_path / "adapter" / "adapter_config.json"  # set after saving: PEFT would look it up online
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()),
                                       "base_model_name_or_path": "Qwen/Qwen-VL-Chat-Int4"}))
    report = merge_adapter(tiny_base, tmp_path / "adapter", tmp_path / "out")
    assert len(report["merged_modules"]) == 4 * 2 and {m["scale"] for m in report["merged_modules"]} == {0.25}
    assert report["base_fingerprint_check"].startswith("not checked")
    assert report["qlora"] and report["quantization"] == "GPTQ int4"
    reference = adapter_logits(tiny_base, tmp_path / "adapter", batch, torch.float32, "cpu")
    assert (merged_logits(tmp_path / "out", batch, torch.float32, "cpu") - reference).abs().max() <= 1e-5


def test_checkpoint_folder_uses_the_run_record_above(adapters, tiny_base, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(adapters("llm"), run / "checkpoint-10")
    (run / "checkpoint-10" / "workbench_run.json").rename(run / "workbench_run.json")
    record = json.loads((run / "workbench_run.json").read_text())
    record["base_model"]["fingerprint"]["config_sha256"] = "0" * 64
    (run / "workbench_run.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=str(run / "workbench_run.json")):
        merge_adapter(tiny_base, run / "checkpoint-10", tmp_path / "out")
