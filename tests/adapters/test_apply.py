"""PEFT application on the tiny reference model: outputs, gradients, save/load, per-component settings."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from workbench.adapters.apply import apply_recipe, param_groups, save_adapter
from workbench.adapters.recipe import load_recipe
from workbench.adapters.targets import component_of

ALL_THREE = {
    "vit": {"modules": ["attn.in_proj", "attn.out_proj", "mlp.c_fc", "mlp.c_proj"], "r": 4, "alpha": 8},
    "resampler": {"modules": ["kv_proj", "attn"], "r": 4, "alpha": 4, "train": ["query", "ln_q"]},
    "llm": {"modules": ["c_attn", "attn.c_proj", "w1", "w2", "mlp.c_proj"], "r": 8, "alpha": 16},
}


@pytest.fixture(scope="module")
def inputs(tiny_ref_dir):
    cases = load_file(str(tiny_ref_dir / "cases.safetensors"))
    return {"ids": cases["case2.input_ids"], "pixels": cases["pixel_values.a"], "text": cases["case1.input_ids"]}


def adapted(tiny, write_recipe, data=ALL_THREE, **overrides):
    return apply_recipe(tiny, load_recipe(str(write_recipe(data)), overrides or None))


def randomize(model, component: str | None = None, part: str = "lora_B") -> None:
    """Give LoRA `part` tensors (of one component, or all) non-zero values, so the adapter acts."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if f".{part}." in name and component in (None, component_of(name)):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)


def outputs(model, inputs) -> dict[str, torch.Tensor]:
    """Each component's output: ViT blocks, resampler (+ ln_post, proj), LLM logits on text only."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    seen = {}
    hook = base.transformer.visual.transformer.register_forward_hook(lambda m, a, out: seen.update(vit=out))
    with torch.no_grad():
        seen["resampler"] = base.transformer.visual(inputs["pixels"])
        seen["llm"] = model(input_ids=inputs["text"]).logits
    hook.remove()
    return seen


@pytest.mark.parametrize("component, unchanged", [("vit", []), ("resampler", ["vit"]), ("llm", ["vit", "resampler"])])
def test_each_component_adapter_changes_its_output(tiny, write_recipe, inputs, component, unchanged):
    before = outputs(tiny, inputs)
    model = adapted(tiny, write_recipe).eval()
    for key, value in outputs(model, inputs).items():  # LoRA starts with B = 0: no change anywhere
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    randomize(model, component)
    after = outputs(model, inputs)
    assert (after[component] - before[component]).abs().max() > 1e-3
    for key in unchanged:  # upstream of the component
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)


@pytest.mark.parametrize("fragment", ["attn_pool.attn.lora_B.", "attn_pool.attn.base_layer.out_proj.lora_B."])
def test_multihead_attention_lora_in_proj_and_out_proj_each_act(tiny, write_recipe, inputs, fragment):
    before = outputs(tiny, inputs)["resampler"]
    model = adapted(tiny, write_recipe).eval()
    with torch.no_grad():
        hits = [p.normal_() for n, p in model.named_parameters() if fragment in n]
    assert len(hits) == 1
    assert (outputs(model, inputs)["resampler"] - before).abs().max() > 1e-3


def test_merge_and_unload_matches_the_adapted_model(tiny, write_recipe, inputs):
    model = adapted(tiny, write_recipe).eval()
    randomize(model)
    adapted_out = outputs(model, inputs)
    merged = model.merge_and_unload()  # includes PEFT's nn.MultiheadAttention merge
    assert type(merged.transformer.visual.attn_pool.attn) is torch.nn.MultiheadAttention
    for key, value in outputs(merged, inputs).items():
        torch.testing.assert_close(value, adapted_out[key], rtol=1e-4, atol=1e-4)


def test_gradients_reach_every_lora_tensor_and_nothing_frozen(tiny, write_recipe, inputs):
    model = adapted(tiny, write_recipe).train()
    randomize(model)  # with B = 0, A would get no gradient
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected_full = {"base_model.model.transformer.visual.attn_pool.query",
                     "base_model.model.transformer.visual.attn_pool.ln_q.weight",
                     "base_model.model.transformer.visual.attn_pool.ln_q.bias"}
    assert {n for n in trainable if ".lora_" not in n} == expected_full
    # tiny: vit 2 blocks x 4, resampler kv_proj + MHA (in_proj and out_proj), llm 2 x 5; A and B each
    assert len([n for n in trainable if ".lora_" in n]) == 2 * (2 * 4 + 3 + 2 * 5)
    loss = model(input_ids=inputs["ids"], labels=inputs["ids"], pixel_values=inputs["pixels"]).loss
    loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


def test_save_and_reload_as_a_plain_peft_adapter(tiny, write_recipe, inputs, tmp_path):
    fresh = copy.deepcopy(tiny)
    model = adapted(tiny, write_recipe).eval()
    randomize(model)
    with torch.no_grad():
        model.base_model.model.transformer.visual.attn_pool.query.add_(1.0)  # a fully trained parameter
    expected = outputs(model, inputs)
    save_adapter(model, tmp_path)
    keys = load_file(str(tmp_path / "adapter_model.safetensors")).keys()
    assert {"base_model.model.transformer.visual.attn_pool.query",
            "base_model.model.transformer.visual.attn_pool.ln_q.weight"} <= set(keys)
    reloaded = PeftModel.from_pretrained(fresh, tmp_path).eval()
    for key, value in outputs(reloaded, inputs).items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)


def test_per_component_rank_alpha_rslora_and_dropout(tiny, write_recipe, tmp_path):
    fresh = copy.deepcopy(tiny)
    data = {**ALL_THREE, "vit": {**ALL_THREE["vit"], "use_rslora": True, "dropout": 0.0},
            "llm": {**ALL_THREE["llm"], "dropout": 0.2}}
    model = adapted(tiny, write_recipe, data)
    layers = dict(model.named_modules())
    vit = layers["base_model.model.transformer.visual.transformer.resblocks.0.mlp.c_fc"]
    llm = layers["base_model.model.transformer.h.1.mlp.w2"]
    mha = layers["base_model.model.transformer.visual.attn_pool.attn"]
    assert vit.lora_A["default"].weight.shape[0] == 4 and llm.lora_A["default"].weight.shape[0] == 8
    assert vit.scaling["default"] == pytest.approx(8 / math.sqrt(4))  # rsLoRA: alpha / sqrt(r)
    assert llm.scaling["default"] == pytest.approx(16 / 8)
    assert mha.scaling["default"] == pytest.approx(4 / 4)
    assert isinstance(vit.lora_dropout["default"], torch.nn.Identity)
    assert llm.lora_dropout["default"].p == 0.2
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_rslora"] is False and config["r"] == 8 and config["lora_alpha"] == 16
    reloaded = PeftModel.from_pretrained(fresh, tmp_path)
    vit2 = dict(reloaded.named_modules())["base_model.model.transformer.visual.transformer.resblocks.0.mlp.c_fc"]
    assert vit2.scaling["default"] == pytest.approx(8 / math.sqrt(4))


def test_param_groups_scale_lr_and_skip_decay_on_1d(tiny, write_recipe):
    data = {**ALL_THREE, "vit": {**ALL_THREE["vit"], "lr_scale": 0.5}, "modules_to_save": ["lm_head"]}
    model = adapted(tiny, write_recipe, data)
    groups = param_groups(model, load_recipe(str(write_recipe(data, "again"))), base_lr=1e-4, weight_decay=0.1)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"llm", "resampler", "resampler.no_decay", "vit"}
    assert by_name["vit"]["lr"] == pytest.approx(5e-5) and by_name["llm"]["lr"] == pytest.approx(1e-4)
    assert by_name["resampler.no_decay"]["weight_decay"] == 0.0 and by_name["llm"]["weight_decay"] == 0.1
    assert all(p.ndim == 1 for p in by_name["resampler.no_decay"]["params"])  # ln_q weight and bias
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters() if p.requires_grad)  # each exactly once
    lm_head_copy = model.base_model.model.lm_head.modules_to_save["default"].weight
    assert any(p is lm_head_copy for p in by_name["llm"]["params"])


def test_save_takes_values_from_a_gathered_state_dict(tiny, write_recipe, tmp_path):
    # FSDP / DeepSpeed hand the Trainer's _save the full gathered state: its values must be saved,
    # not this rank's (sharded) parameters.
    model = adapted(tiny, write_recipe)
    gathered = {k: v.clone() + 1.0 for k, v in model.state_dict().items()}
    save_adapter(model, tmp_path, state_dict=gathered)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    query = "base_model.model.transformer.visual.attn_pool.query"
    torch.testing.assert_close(saved[query], gathered[query], rtol=0, atol=0)
    lora = next(k for k in saved if ".lora_A." in k)
    gathered_lora = next(v for k, v in gathered.items() if k.replace(".default", "") == lora)
    torch.testing.assert_close(saved[lora], gathered_lora, rtol=0, atol=0)
