"""Target resolution on the full-size release (meta device) and the model-dependent validation errors."""

from __future__ import annotations

import copy

import pytest
import torch

from workbench.adapters.apply import apply_recipe
from workbench.adapters.recipe import load_recipe
from workbench.adapters.targets import component_of, parse_layers, resolve_targets
from workbench.errors import ConfigError

# Release sizes (docs/qwen-vl.md §4.1, docs/qwen-vl.md §5.1), for the hand computations below.
E, F, W, M = 4096, 11008, 1664, 8192  # LLM width, LLM MLP branch, ViT width, ViT MLP width


def lora_counts(model: torch.nn.Module, recipe_name: str, **overrides) -> dict[str, int]:
    """LoRA parameters per component after PEFT really wraps a (copied) meta model."""
    with torch.device("meta"):
        peft_model = apply_recipe(copy.deepcopy(model), load_recipe(recipe_name, overrides))
    counts = {"vit": 0, "resampler": 0, "llm": 0}
    for name, param in peft_model.named_parameters():
        if ".lora_" in name:
            counts[component_of(name)] += param.numel()
    return counts


def test_official_recipe_on_the_release(full_meta):
    targets = resolve_targets(full_meta, load_recipe("official-lora"))
    llm = targets.components["llm"]
    assert len(llm.modules) == 128 and llm.layers == list(range(32))
    assert {m.split(".", 3)[3] for m in llm.modules} == {"attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2"}
    assert not targets.components["vit"].modules and not targets.components["resampler"].modules
    assert targets.quantize == [] and targets.modules_to_save == []
    counts = lora_counts(full_meta, "official-lora")
    # r (in + out) per module: c_attn E->3E, attn.c_proj E->E, w1 and w2 E->F; 32 layers, r 64.
    assert 32 * 64 * ((E + 3 * E) + (E + E) + 2 * (E + F)) == 112_197_632
    assert counts == {"vit": 0, "resampler": 0, "llm": 112_197_632}


def test_grounding_recipe_counts(full_meta):
    targets = resolve_targets(full_meta, load_recipe("grounding"))
    assert len(targets.components["llm"].modules) == 5 * 32
    assert targets.components["resampler"].modules == ["transformer.visual.attn_pool.attn",
                                                       "transformer.visual.attn_pool.kv_proj"]
    assert targets.components["resampler"].train == [
        "transformer.visual.attn_pool.query", "transformer.visual.attn_pool.ln_q.weight",
        "transformer.visual.attn_pool.ln_q.bias", "transformer.visual.attn_pool.ln_kv.weight",
        "transformer.visual.attn_pool.ln_kv.bias"]
    counts = lora_counts(full_meta, "grounding")
    assert counts["llm"] == 32 * 64 * ((E + 3 * E) + (E + E) + 2 * (E + F) + (F + E))
    # kv_proj W->E; nn.MultiheadAttention: packed in_proj E->3E plus out_proj E->E; r 32.
    assert counts["resampler"] == 32 * (W + E) + 32 * ((E + 3 * E) + (E + E))


def test_vit_resampler_llm_counts(full_meta):
    targets = resolve_targets(full_meta, load_recipe("all-components"))
    vit = targets.components["vit"]
    assert vit.layers == list(range(40, 48)) and len(vit.modules) == 4 * 8
    assert all(m.startswith("transformer.visual.transformer.resblocks.4") for m in vit.modules)
    counts = lora_counts(full_meta, "all-components")
    # in_proj W->3W, out_proj W->W, c_fc W->M, c_proj M->W; 8 blocks, r 16.
    assert counts["vit"] == 8 * 16 * ((W + 3 * W) + (W + W) + (W + M) + (M + W)) == 3_801_088
    assert counts["resampler"] == 64 * (W + E) + 64 * 6 * E
    assert counts["llm"] == 112_197_632


def test_qlora_quantises_exactly_the_llm_linears(full_meta):
    targets = resolve_targets(full_meta, load_recipe("qlora"))
    expected = sorted(f"transformer.h.{i}.{m}" for i in range(32)
                      for m in ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj"))
    assert targets.quantize == expected  # 160, the set the Int4 release quantises; no ViT, wte, lm_head
    vit = resolve_targets(full_meta, load_recipe("qlora", {"quantization": {"components": ["resampler", "lm_head"]}}))
    # the resampler's only quantisable linear is kv_proj: the MHA's out_proj is used through F.linear
    assert vit.quantize == ["lm_head", "transformer.visual.attn_pool.kv_proj"]


def test_rank_and_layer_overrides_change_counts(full_meta):
    counts = lora_counts(full_meta, "official-lora", llm={"r": 8, "layers": "first 2"})
    assert counts["llm"] == 2 * 8 * ((E + 3 * E) + (E + E) + 2 * (E + F))


@pytest.mark.parametrize("spec, expected", [
    ("all", [0, 1, 2, 3]), (2, [2]), ("1-2", [1, 2]), ("last 2", [2, 3]), ("first 1", [0]),
    ([0, "2-3"], [0, 2, 3]), (["last 1", 0, 3], [0, 3]),
])
def test_parse_layers(spec, expected):
    assert parse_layers(spec, 4, "x.yaml: llm.layers") == expected


@pytest.mark.parametrize("spec, message", [
    ("3-5", "x.yaml: llm.layers: layer 4 is out of range; this model has 4 layers, 0-3"),
    (7, "layer 7 is out of range"),
    ("last 9", "x.yaml: llm.layers: 'last 9' asks for 9 layers; this model has 4"),
    ("last eight", "x.yaml: llm.layers: cannot read 'last eight'; use all, 5"),
    ("3-1", "cannot read '3-1'"),
    ([], "x.yaml: llm.layers: selects no layer"),
])
def test_parse_layers_errors(spec, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        parse_layers(spec, 4, "x.yaml: llm.layers")


LLM = {"modules": ["c_attn"]}


@pytest.mark.parametrize("data, message", [
    ({"llm": {"modules": ["w3"]}}, "llm.modules: 'w3' matches no module of the llm; did you mean 'w2'?"),
    ({"llm": {"modules": ["attn.c_atn"]}}, "'attn.c_atn' matches no module of the llm; did you mean 'attn.c_attn'?"),
    ({"llm": LLM, "vit": {"modules": ["c_attn"]}}, "vit.modules: 'c_attn' matches no module of the vit; "
                                                    "valid: attn.in_proj, attn.out_proj, c_fc, c_proj,"),
    ({"llm": LLM, "resampler": {"modules": ["kv_prj"]}}, "resampler.modules: 'kv_prj' matches no module of the "
                                                      "resampler; did you mean 'kv_proj'?"),
    ({"llm": {**LLM, "layers": "1-2"}}, "llm.layers: layer 2 is out of range; this model has 2 layers, 0-1"),
    ({"llm": LLM, "vit": {"modules": ["mlp.c_fc"], "layers": "last 3"}}, "vit.layers: 'last 3' asks for 3 "
                                                                          "layers; this model has 2"),
    ({"llm": LLM, "resampler": {"train": ["querry"]}}, "resampler.train: 'querry' matches no parameter of the "
                                                        "resampler; did you mean 'query'?"),
    ({"llm": {**LLM, "train": ["c_attn.bias"]}}, "llm.train: 'transformer.h.0.attn.c_attn.bias' belongs to "
                                                  "'transformer.h.0.attn.c_attn', which llm.modules already adapts"),
    ({"llm": {**LLM, "use_dora": True}, "vit": {"modules": ["c_fc"]}}, "llm.use_dora: is True but "
                                                                         "vit.use_dora is False"),
    ({"llm": {**LLM, "use_dora": True}, "resampler": {"modules": ["attn"], "use_dora": True}},
     "resampler.use_dora: PEFT has no DoRA for nn.MultiheadAttention"),
    ({"llm": LLM, "modules_to_save": ["lm_haed"]}, "modules_to_save: 'lm_haed' matches no module; "
                                                   "did you mean 'lm_head'?"),
    ({"llm": LLM, "modules_to_save": ["c_attn"]}, "modules_to_save: 'transformer.h.0.attn.c_attn' overlaps "
                                                  "LoRA target"),
    ({"llm": {**LLM, "train": ["mlp.c_proj"]}, "quantization": {}}, "llm.train: 'transformer.h.0.mlp.c_proj."
                                                                     "weight' is quantised"),
    ({"llm": LLM, "quantization": {"components": ["lm_head"]}, "modules_to_save": ["lm_head"]},
     "modules_to_save: 'lm_head' is quantised"),
    ({"vit": {"layers": 1}, "llm": {"lr_scale": 2}}, "recipe.yaml: nothing trains"),
])
def test_model_dependent_errors(tiny_meta, write_recipe, data, message):
    path = write_recipe(data)
    with pytest.raises(ConfigError) as err:
        resolve_targets(tiny_meta, load_recipe(str(path)))
    assert str(err.value).startswith(str(path)), err.value
    assert message in str(err.value)


def test_model_dependent_error_from_an_override_names_the_run_config(tiny_meta):
    recipe = load_recipe("official-lora", {"llm": {"layers": "30-31"}}, source="configs/run.yaml")
    with pytest.raises(ConfigError, match=r"^configs/run.yaml: adapter_overrides.llm.layers: layer 30 is out of"):
        resolve_targets(tiny_meta, recipe)


def test_train_patterns_respect_layers(tiny_meta, write_recipe):
    path = write_recipe({"vit": {"modules": ["mlp.c_fc"], "layers": [1], "train": ["ln_1", "ln_pre"]}})
    vit = resolve_targets(tiny_meta, load_recipe(str(path))).components["vit"]
    prefix = "transformer.visual."
    assert vit.modules == [prefix + "transformer.resblocks.1.mlp.c_fc"]
    assert vit.train == [prefix + "transformer.resblocks.1.ln_1.weight", prefix + "transformer.resblocks.1.ln_1.bias",
                         prefix + "ln_pre.weight", prefix + "ln_pre.bias"]


def test_component_of():
    assert component_of("base_model.model.transformer.visual.attn_pool.query") == "resampler"
    assert component_of("transformer.visual.proj") == "resampler"
    assert component_of("transformer.visual.ln_post.weight") == "resampler"
    assert component_of("transformer.visual.transformer.resblocks.3.ln_1.weight") == "vit"
    assert component_of("transformer.visual.conv1.weight") == "vit"
    assert component_of("base_model.model.lm_head.modules_to_save.default.weight") == "llm"
    assert component_of("transformer.ln_f.weight") == "llm"
