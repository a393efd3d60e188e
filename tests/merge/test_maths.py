"""Merge maths against PEFT's own merge_and_unload, on a toy model with every layer kind PEFT adapts."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from workbench.errors import CheckpointError
from workbench.merge.adapter import read_adapter
from workbench.merge.merge import merge_tensor


class Pool(nn.Module):
    def __init__(self):
        super().__init__()
        self.kv_proj = nn.Linear(8, 16, bias=False)
        self.attn = nn.MultiheadAttention(16, 2)  # packed in_proj_weight + out_proj, as attn_pool.attn


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(10, 16)
        self.conv1 = nn.Conv2d(3, 16, 2, 2, bias=False)
        self.pool = Pool()
        self.c_attn = nn.Linear(16, 48)
        self.w1 = nn.Linear(16, 24, bias=False)
        self.ln = nn.LayerNorm(16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return x


def _peft_merge(config: LoraConfig, tmp_path) -> tuple[dict, dict, object]:
    torch.manual_seed(0)
    base = Toy()
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.normal_(0.5 if "magnitude" in name else 0.0, 0.3)
    model.save_pretrained(tmp_path / "adapter")
    expected = model.merge_and_unload().state_dict()
    return base_sd, expected, read_adapter(tmp_path / "adapter", set(base_sd))


CONFIGS = {
    "patterns": dict(target_modules=["wte", "conv1", "kv_proj", "pool.attn", "c_attn", "w1"],
                     rank_pattern={"c_attn": 2, "pool.attn": 3}, alpha_pattern={"w1": 5, "pool.attn": 7},
                     modules_to_save=["head", "ln"]),
    "rslora": dict(target_modules=["kv_proj", "pool.attn", "c_attn", "w1"], use_rslora=True),
    "dora": dict(target_modules=["kv_proj", "c_attn", "w1"], use_dora=True),
    "lora_bias": dict(target_modules=["c_attn"], lora_bias=True),
}


# The CPU maths' row blocks (merge.BLOCK_BYTES): the whole toy tensor at once, one row at a time,
# and 320 bytes = 5 float32 rows of 16 (c_attn's 48 rows end in a short block of 3).
BLOCKS = {"whole": 4 << 20, "row": 1, "ragged": 320}


@pytest.mark.filterwarnings("ignore:Adapter 'default'.*invalid shape")  # PEFT misreads lora_B.bias
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("name", CONFIGS)
def test_merge_tensor_matches_peft_merge_and_unload(name, block, tmp_path, monkeypatch):
    from workbench.merge import merge as merge_mod

    monkeypatch.setattr(merge_mod, "BLOCK_BYTES", BLOCKS[block])
    config = LoraConfig(r=4, lora_alpha=8, **CONFIGS[name])
    base_sd, expected, adapter = _peft_merge(config, tmp_path)
    assert set(expected) == set(base_sd)
    for key, tensor in base_sd.items():
        merged, action = merge_tensor(key, tensor, adapter, None)
        torch.testing.assert_close(merged, expected[key], rtol=0, atol=2e-6, msg=key)
        if action is None:
            assert torch.equal(merged, tensor), key
        else:
            assert not torch.equal(merged, tensor), key  # the adapter really changed it


def test_mha_in_proj_and_out_proj_both_merge(tmp_path):
    _, _, adapter = _peft_merge(LoraConfig(r=4, lora_alpha=8, target_modules=["pool.attn"]), tmp_path)
    assert set(adapter.deltas) == {"pool.attn.in_proj_weight", "pool.attn.out_proj.weight"}
    assert adapter.deltas["pool.attn.in_proj_weight"].B.shape == (48, 4)  # q, k, v blocks stacked


def test_rank_and_alpha_patterns_give_per_module_scale(tmp_path):
    config = LoraConfig(r=4, lora_alpha=8, **CONFIGS["patterns"])
    _, _, adapter = _peft_merge(config, tmp_path)
    scales = {key: (d.rank, d.scale) for key, d in adapter.deltas.items()}
    assert scales["c_attn.weight"] == (2, 8 / 2)
    assert scales["w1.weight"] == (4, 5 / 4)
    assert scales["pool.attn.in_proj_weight"] == (3, 7 / 3)
    assert scales["pool.attn.out_proj.weight"] == (3, 2 * 7 / 3)  # PEFT applies it twice (peft#3774)
    assert scales["pool.kv_proj.weight"] == (4, 2.0)


def test_output_dtype_cast_after_float32_maths(tmp_path):
    base_sd, expected, adapter = _peft_merge(LoraConfig(r=4, lora_alpha=8, target_modules=["w1"]), tmp_path)
    merged, _ = merge_tensor("w1.weight", base_sd["w1.weight"], adapter, torch.bfloat16)
    assert merged.dtype == torch.bfloat16
    assert torch.equal(merged, expected["w1.weight"].to(torch.bfloat16))


def test_adapter_for_another_model_is_refused(tmp_path):
    _peft_merge(LoraConfig(r=4, lora_alpha=8, target_modules=["w1"]), tmp_path)
    with pytest.raises(CheckpointError, match="'w1' has no weight in the base"):
        read_adapter(tmp_path / "adapter", {"c_attn.weight"})


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_scratch_buffers_hand_over_every_tensor_intact_to_a_slow_writer(adapters, tiny_base, tmp_path, monkeypatch,
                                                                        dtype):
    """The CPU maths reuse two output buffers in turn: each merged tensor must reach the disk before
    its buffer is used again, however slowly the writer goes."""
    import time

    from safetensors.torch import load_file

    from workbench.merge import merge as merge_mod
    from workbench.model.checkpoint import weight_map

    adapter = adapters("llm")
    merge_mod.merge_adapter(tiny_base, adapter, tmp_path / "fast", dtype=dtype)

    class SlowWriter(merge_mod.ShardWriter):
        def add(self, name, tensor):
            time.sleep(0.002)
            super().add(name, tensor)

    monkeypatch.setattr(merge_mod, "ShardWriter", SlowWriter)
    report = merge_mod.merge_adapter(tiny_base, adapter, tmp_path / "slow", dtype=dtype)
    assert report["merged_modules"]
    for folder in ("fast", "slow"):
        assert sorted(weight_map(tmp_path / folder)) == sorted(weight_map(tiny_base))
    fast = {k: v for f in set(weight_map(tmp_path / "fast").values()) for k, v in load_file(f).items()}
    slow = {k: v for f in set(weight_map(tmp_path / "slow").values()) for k, v in load_file(f).items()}
    assert fast.keys() == slow.keys() and all(torch.equal(fast[k], slow[k]) for k in fast)
    # and the buffers really were reused: a merged LoRA weight equals the hand computation
    deltas = read_adapter(adapter, set(weight_map(tiny_base))).deltas
    key, d = next((k, d) for k, d in deltas.items() if not d.embedding)
    base = load_file(weight_map(tiny_base)[key])[key]
    expected = (base.float() + d.scale * (d.B.float() @ d.A.float())).to(dtype or base.dtype)
    assert torch.equal(slow[key], expected)
