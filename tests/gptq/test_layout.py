"""The Int4 layout planned on the meta device against the published Qwen-VL-Chat-Int4 (tests/reference)."""

import json

import pytest
import torch

from tests.conftest import INT4_REF, REAL_REF
from workbench.gptq.layout import GPTQSpec, packed_specs, plan
from workbench.model.config import load_config
from workbench.model.modeling import QWenLMHeadModel


@pytest.fixture(scope="module")
def release_plan():
    with torch.device("meta"):
        model = QWenLMHeadModel(load_config(REAL_REF))
    spec = GPTQSpec.from_config(load_config(INT4_REF))
    return {s.name: s for s in plan(model, spec)}


def test_names_equal_the_int4_release_index(release_plan):
    index = json.loads((INT4_REF / "model.safetensors.index.json").read_text())
    assert set(release_plan) == set(index["weight_map"])


def test_total_bytes_equal_the_int4_release(release_plan):
    assert sum(s.nbytes for s in release_plan.values()) == 9_731_786_240


# Hand computation for block 0 of the 9.6B model (hidden 4096, intermediate 22016 -> w1/w2 11008 each).
BLOCK0 = [
    ("attn.c_attn.qweight", torch.int32, (4096 // 8, 3 * 4096)),
    ("attn.c_attn.qzeros", torch.int32, (4096 // 128, 3 * 4096 // 8)),
    ("attn.c_attn.scales", torch.float16, (4096 // 128, 3 * 4096)),
    ("attn.c_attn.g_idx", torch.int32, (4096,)),
    ("attn.c_attn.bias", torch.float16, (3 * 4096,)),
    ("mlp.c_proj.qweight", torch.int32, (11008 // 8, 4096)),
    ("mlp.c_proj.scales", torch.float16, (11008 // 128, 4096)),
    ("mlp.w1.qzeros", torch.int32, (4096 // 128, 11008 // 8)),
    ("mlp.w2.bias", torch.float16, (11008,)),  # the release stores a zero bias where the model has none
    ("ln_1.weight", torch.float16, (4096,)),
]


@pytest.mark.parametrize("name,dtype,shape", BLOCK0)
def test_block0_tensor(release_plan, name, dtype, shape):
    spec = release_plan[f"transformer.h.0.{name}"]
    assert (spec.dtype, spec.shape) == (dtype, shape)


def test_vision_and_embeddings_stay_float16(release_plan):
    for name in ("transformer.visual.conv1.weight", "transformer.visual.attn_pool.kv_proj.weight",
                 "transformer.wte.weight", "lm_head.weight"):
        assert release_plan[name].dtype == torch.float16


@pytest.mark.parametrize("group_size,bits,groups,qweight_rows", [(128, 4, 2, 32), (-1, 4, 1, 32), (64, 8, 4, 64)])
def test_packed_specs_by_hand(group_size, bits, groups, qweight_rows):
    specs = {s.name.rpartition(".")[2]: s for s in packed_specs("x", 256, 64, GPTQSpec(bits=bits, group_size=group_size))}
    assert specs["qweight"].shape == (qweight_rows, 64)
    assert specs["qzeros"].shape == (groups, 64 * bits // 32)
    assert specs["scales"].shape == (groups, 64)


@pytest.mark.parametrize("kwargs,message", [
    ({"bits": 3}, "bits: 3"), ({"group_size": 0}, "group_size: 0"), ({"damp_percent": 1.5}, "damp_percent"),
])
def test_bad_spec_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GPTQSpec(**kwargs)


def test_group_size_that_does_not_divide_is_named():
    with pytest.raises(ValueError, match="group_size 96 does not divide transformer.h.0.attn.c_proj's 4096"):
        GPTQSpec(group_size=96).check_divides("transformer.h.0.attn.c_proj", 4096)


@pytest.mark.parametrize("folder,is_gptq", [(REAL_REF, False), (INT4_REF, True)])
def test_inspect_gives_the_int4_base_memory_and_both_export_sizes(folder, is_gptq):
    from workbench.adapters.inspect import inspect_recipe
    from workbench.adapters.recipe import load_recipe

    report = inspect_recipe(folder, load_recipe("official-lora"))
    # The published checkpoints: 19,313,870,336 bytes (bf16 index) and 9,731,786,240 (Int4 index).
    assert report["export_bytes"] == {"16bit": 19_313_870_336, "int4": 9_731_786_240}
    m = report["memory_bytes"]
    assert m["weights_gptq"] == 9_731_786_240  # official-lora trains nothing in place
    assert m["total_gptq"] == m["weights_gptq"] + m["trainable"]
    assert report["gptq"]["base_is_gptq"] is is_gptq
