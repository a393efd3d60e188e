"""Recipe schema: loading, overrides, and every validation error that needs no model."""

from __future__ import annotations

from pathlib import Path

import pytest

from workbench.adapters.recipe import RECIPE_DIR, available_recipes, load_recipe
from workbench.errors import ConfigError

SHIPPED = ["grounding", "llm-resampler", "official-lora", "qlora", "all-components"]
LLM = {"modules": ["c_attn"], "r": 8, "alpha": 16}


def test_shipped_recipes_load_from_the_repo_adapters_folder():
    assert RECIPE_DIR.resolve() == Path(__file__).resolve().parents[2] / "adapters"  # through workbench/recipes
    assert set(SHIPPED) <= set(available_recipes())
    for name in SHIPPED:
        recipe = load_recipe(name)
        assert recipe.description, name
        assert recipe.components["llm"].adapted, name  # every shipped recipe adapts the LLM


def test_official_recipe_is_the_finetune_py_lora_config():
    r = load_recipe("official-lora")
    llm = r.components["llm"]
    assert (llm.modules, llm.layers, llm.r, llm.alpha, llm.dropout) == (
        ("c_attn", "attn.c_proj", "w1", "w2"), "all", 64, 16.0, 0.05)
    assert not llm.use_rslora and not llm.use_dora and r.modules_to_save == () and r.quantization is None
    assert not r.components["vit"].trainable and not r.components["resampler"].trainable


def test_qlora_recipe_quantises_llm_in_nf4():
    q = load_recipe("qlora").quantization
    assert (q.bits, q.quant_type, q.double_quant, q.compute_dtype, q.components) == (
        4, "nf4", True, "bfloat16", ("llm",))


def test_path_and_defaults(write_recipe):
    path = write_recipe({"llm": {"modules": "w1"}})
    r = load_recipe(str(path))
    llm = r.components["llm"]
    assert r.name == "recipe" and r.file == str(path)
    assert (llm.modules, llm.layers, llm.r, llm.alpha, llm.dropout, llm.lr_scale) == (
        ("w1",), "all", 8, 16.0, 0.0, 1.0)
    assert not r.components["vit"].trainable  # absent component: frozen


def test_overrides_deep_merge_lists_replace():
    r = load_recipe("llm-resampler", {"llm": {"r": 16, "modules": ["w1"]}, "resampler": {"lr_scale": 0.1},
                                      "modules_to_save": ["lm_head"]}, source="run.yaml")
    llm, res = r.components["llm"], r.components["resampler"]
    assert (llm.r, llm.alpha, llm.modules) == (16, 16.0, ("w1",))  # alpha kept, list replaced
    assert (res.lr_scale, res.modules, res.train) == (0.1, ("kv_proj", "attn"), ("query", "ln_q", "ln_kv"))
    assert r.modules_to_save == ("lm_head",)
    assert r.where("llm.r") == "run.yaml: adapter_overrides.llm.r"
    assert r.where("llm.alpha") == f"{RECIPE_DIR / 'llm-resampler.yaml'}: llm.alpha"


def test_override_null_removes_quantization():
    assert load_recipe("qlora", {"quantization": None}).quantization is None


def test_to_dict_round_trips(write_recipe):
    r = load_recipe("all-components", {"quantization": {"bits": 8}})
    again = load_recipe(str(write_recipe(r.to_dict())))
    assert again.components == r.components and again.quantization == r.quantization


@pytest.mark.parametrize("data, message", [
    ({"quantisation": {}, "llm": LLM}, "recipe.yaml: quantisation: unknown key; did you mean 'quantization'?"),
    ({"llm": {**LLM, "dropuot": 0.1}}, "recipe.yaml: llm.dropuot: unknown key; did you mean 'dropout'?"),
    ({"llm": LLM, "vit": {"modules": ["mlp.c_fc"], "lr": 0.5}}, "vit.lr: unknown key; did you mean 'lr_scale'?"),
    ({"llm": LLM, "resampler": {"layers": "all"}}, "resampler.layers: unknown key; valid: modules, r,"),
    ({"llm": LLM, "quantization": {"bit": 4}}, "quantization.bit: unknown key; did you mean 'bits'?"),
    ({"llm": {**LLM, "frozen": True}}, "recipe.yaml: llm.frozen: the component is frozen but llm.modules"),
    ({"llm": LLM, "resampler": {"frozen": True, "train": ["query"]}}, "resampler.frozen: the component is "
                                                                        "frozen but resampler.train"),
    ({"llm": {**LLM, "r": 0}}, "llm.r: must be an integer >= 1, got 0"),
    ({"llm": {**LLM, "r": 8.5}}, "llm.r: expected an integer, got 8.5"),
    ({"llm": {**LLM, "alpha": 0}}, "llm.alpha: must be a number > 0, got 0"),
    ({"llm": {**LLM, "dropout": 1.0}}, "llm.dropout: must be a number < 1, got 1.0"),
    ({"llm": {**LLM, "use_dora": "yes"}}, "llm.use_dora: expected true or false, got 'yes'"),
    ({"llm": {**LLM, "lr_scale": 0}}, "llm.lr_scale: must be a number > 0, got 0"),
    ({"llm": {**LLM, "modules": [1]}}, "llm.modules: expected a name or a list of names, got [1]"),
    ({"llm": [1]}, "recipe.yaml: llm: expected a mapping, got [1]"),
    ({"llm": LLM, "description": 5}, "description: expected a string, got 5"),
    ({"llm": LLM, "quantization": {"bits": 3}}, "quantization.bits: 3 is not one of 4, 8; valid: 4, 8"),
    ({"llm": LLM, "quantization": {"quant_type": "nf5"}}, "quantization.quant_type: 'nf5' is not one of nf4, fp4; "
                                                           "did you mean 'nf4'?"),
    ({"llm": LLM, "quantization": {"compute_dtype": "bf16"}}, "compute_dtype: 'bf16' is not one of bfloat16, float16, float32; "
                                                               "did you mean 'bfloat16'?"),
    ({"llm": LLM, "quantization": {"components": ["llmm"]}}, "quantization.components: 'llmm' is not one of "
                                                              "vit, resampler, llm, lm_head; did you mean 'llm'?"),
])
def test_recipe_errors_name_file_key_and_fix(write_recipe, data, message):
    path = write_recipe(data)
    with pytest.raises(ConfigError) as err:
        load_recipe(str(path))
    assert message in str(err.value)
    assert str(err.value).startswith(str(path)) or message.startswith("recipe.yaml")


@pytest.mark.parametrize("overrides, message", [
    ({"llm": {"rr": 4}}, "run.yaml: adapter_overrides.llm.rr: unknown key; did you mean 'r'?"),
    ({"vitt": {}}, "run.yaml: adapter_overrides.vitt: unknown key; did you mean 'vit'?"),
    ({"llm": {"frozen": True}}, "run.yaml: adapter_overrides.llm.frozen: the component is frozen"),
    ({"llm": {"r": -1}}, "run.yaml: adapter_overrides.llm.r: must be an integer >= 1"),
    ({"quantization": {"bits": 2}}, "run.yaml: adapter_overrides.quantization.bits: 2 is not one of 4, 8"),
])
def test_override_errors_name_the_run_config(overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_recipe("official-lora", overrides, source="run.yaml")


def test_unknown_recipe_name_suggests_nearest():
    with pytest.raises(ConfigError, match="run.yaml: adapter: no recipe 'oficial-lora'.*did you mean 'official-lora'"):
        load_recipe("oficial-lora", source="run.yaml")


def test_invalid_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("llm: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_recipe(str(path))
