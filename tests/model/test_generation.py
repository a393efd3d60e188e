"""Greedy generation with the KV cache reproduces golden case6 ids exactly."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from workbench.model.checkpoint import load_model
from workbench.model.modeling import StopWordsLogitsProcessor


@pytest.fixture(scope="module")
def model(tiny_ref_dir):
    model = load_model(tiny_ref_dir, dtype=torch.float32)
    model.image_root = tiny_ref_dir
    return model


def test_generation_config_comes_from_the_folder(model):
    assert (model.generation_config.top_p, model.generation_config.eos_token_id) == (0.3, 511)
    assert model.generation_config.chat_format == "chatml"


@pytest.mark.parametrize("case", ["case1", "case2"])
def test_greedy_ids(model, golden, case):
    prompt = torch.tensor([golden["case6"][case]["prompt_ids"]])
    out = model.generate(prompt, do_sample=False, max_new_tokens=16, stop_words_ids=[[513], [512]])
    assert out[0, : prompt.shape[1]].tolist() == prompt[0].tolist()
    assert out[0, prompt.shape[1]:].tolist() == golden["case6"][case]["generated_ids"]


def test_left_padded_batch(model, golden):
    batch = golden["case6"]["left_padded_batch"]
    ids, mask = torch.tensor(batch["input_ids"]), torch.tensor(batch["attention_mask"])
    out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=16)
    for row, expected in enumerate(batch["rows"]):
        assert out[row, ids.shape[1]:].tolist() == expected["generated_ids"]


def test_stop_words_force_eos():
    processor = StopWordsLogitsProcessor([[513], [7, 8], [511]], eos_token_id=511)
    scores = torch.zeros(3, 600)
    out = processor(torch.tensor([[1, 513], [7, 8], [8, 7]]), scores)
    assert out[:, 511].tolist() == [32768.0, 32768.0, 0.0]
    assert processor.stop_words_ids == [[513], [7, 8]]  # [eos] itself is dropped


def test_cache_carries_the_prefill_ntk_alpha(model):
    """Decoding reuses the alpha its prefill chose (workbench rule, docs/qwen-vl.md §5.4)."""
    ids = torch.randint(0, 511, (1, 2100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        cache = DynamicCache(config=model.config)
        model(ids[:, :-1], past_key_values=cache, use_cache=True)
        assert cache.ntk_alpha == 3
        step = model(ids[:, -1:], past_key_values=cache, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-4, rtol=1e-4)
