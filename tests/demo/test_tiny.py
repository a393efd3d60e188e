"""The tiny factory: with the reference vocab and seed it rebuilds the reference tiny model exactly."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from workbench import load_model, load_tokenizer
from workbench.demo.tiny import make_tiny_model_dir


def test_factory_reproduces_the_reference_tiny_model(tmp_path, tiny_ref_dir):
    out = make_tiny_model_dir(tmp_path, vocab_file=tiny_ref_dir / "qwen.tiktoken", seed=20240601)
    ours, ref = load_file(out / "model.safetensors"), load_file(tiny_ref_dir / "model.safetensors")
    assert sorted(ours) == sorted(ref)
    for key in ref:  # same draws, same scales, sin-cos pos_embed, 0.01 padding rows of lm_head
        if key.endswith("attn_pool.pos_embed"):
            # numpy's float32 sin/cos take CPU-specific SIMD paths: on some CPUs a few entries of the
            # fixed sin-cos table differ from the reference machine's by one ulp (4.8e-7).
            torch.testing.assert_close(ours[key], ref[key], atol=5e-7, rtol=0, msg=key)
            continue
        assert torch.equal(ours[key], ref[key]), key
    config, ref_config = (json.loads((d / "config.json").read_text()) for d in (out, tiny_ref_dir))
    assert {k: v for k, v in config.items() if k != "transformers_version"} == \
        {k: v for k, v in ref_config.items() if k != "transformers_version"}
    for name in ("generation_config.json", "tokenizer_config.json"):
        ours_json, ref_json = (json.loads((d / name).read_text()) for d in (out, tiny_ref_dir))
        ours_json.pop("transformers_version", None)
        ref_json.pop("transformers_version", None)
        assert ours_json == ref_json, name
    assert (out / "qwen.tiktoken").read_bytes() == (tiny_ref_dir / "qwen.tiktoken").read_bytes()


def test_default_byte_vocab_model_runs(tmp_path):
    out = make_tiny_model_dir(tmp_path, num_hidden_layers=1, visual={"layers": 1})
    tok = load_tokenizer(out)
    config = json.loads((out / "config.json").read_text())
    assert tok.eod_id == 256 and len(tok) == 256 + 217
    assert config["vocab_size"] == 512 and config["visual"]["image_start_id"] == tok.img_start_id == 470
    assert config["num_hidden_layers"] == 1 and config["visual"]["layers"] == 1
    model = load_model(out)
    ids = torch.tensor([tok.encode("hello world")])
    out_ids = model.generate(ids, do_sample=False, max_new_tokens=4)
    assert out_ids.shape == (1, ids.shape[1] + 4) or tok.eod_id in out_ids[0, ids.shape[1]:].tolist()
    assert (out_ids[0, ids.shape[1]:] < len(tok)).all()  # padding rows of lm_head are never picked
