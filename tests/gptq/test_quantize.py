"""`workbench quantize` on the tiny model: the files, the reloaded weights, the logits, the refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from tests.conftest import TINY_REF
from workbench.cli.main import main
from workbench.gptq.layout import GPTQSpec, plan
from workbench.model.checkpoint import load_model
from workbench.model.config import load_config
from workbench.model.modeling import QWenLMHeadModel


def unpack(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Hand unpacking of int32 words along dim 0 (qweight) -> codes, low bits first."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    codes = (words[:, None, :] >> shifts[None, :, None]) & (2**bits - 1)
    return codes.reshape(-1, words.shape[1])


def hand_weight(t: dict[str, torch.Tensor], bits: int, group_size: int) -> torch.Tensor:
    """[out, in] weight of the release's (v1) tensors: scales * (code - (stored zero + 1)), the product
    rounded to float16 once, as a float16 multiply does."""
    codes = unpack(t["qweight"], bits).float()                                  # [in, out]
    zeros = unpack(t["qzeros"].T.contiguous(), bits).T.float() + 1              # [groups, out]
    group = torch.arange(codes.shape[0]) // group_size
    assert torch.equal(t["g_idx"].long(), group)
    return ((codes - zeros[group]) * t["scales"].float()[group]).half().float().T


@pytest.fixture(scope="module")
def models(int4_model):
    q = load_model(int4_model, dtype=torch.float32)
    f = load_model(TINY_REF, dtype=torch.float32)
    q.image_root = f.image_root = TINY_REF
    return f, q


def test_files_are_the_release_layout(int4_model):
    with torch.device("meta"):
        meta = QWenLMHeadModel(load_config(TINY_REF))
    planned = {s.name: (s.dtype, s.shape) for s in plan(meta, GPTQSpec(group_size=64))}
    with safe_open(int4_model / "model.safetensors", framework="pt") as f:
        written = {k: (f.get_tensor(k).dtype, tuple(f.get_tensor(k).shape)) for k in f.keys()}
    assert written == planned
    config = json.loads((int4_model / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "gptq" and config["torch_dtype"] == "float16"
    assert json.loads((int4_model / "quantize_config.json").read_text())["group_size"] == 64
    assert (int4_model / "qwen.tiktoken").is_file()


def test_reloaded_weights_equal_the_hand_dequantisation(int4_model, models):
    _, q = models
    with safe_open(int4_model / "model.safetensors", framework="pt") as f:
        for name in ("transformer.h.0.attn.c_attn", "transformer.h.1.mlp.w2", "transformer.h.1.mlp.c_proj"):
            tensors = {k: f.get_tensor(f"{name}.{k}") for k in ("qweight", "qzeros", "scales", "g_idx", "bias")}
            module = q.get_submodule(name)
            library = module.dequantize_weight().T.float()
            torch.testing.assert_close(library, hand_weight(tensors, 4, 64), atol=0, rtol=0)
            x = torch.randn(3, module.in_features)
            expected = x @ hand_weight(tensors, 4, 64).T + tensors["bias"].float()
            torch.testing.assert_close(module(x), expected, atol=1e-5, rtol=1e-5)


# Measured on the three reference prompts (image + text, 151-572 tokens): relative logit error
# 0.078-0.127 and per-position greedy agreement 0.75-0.84 (4-bit, group 64, 32 calibration samples,
# a random model, whose flat next-token distributions make the hardest case). docs/int4.md.
@pytest.mark.parametrize("case", ["case1", "case2", "case3"])
def test_logits_stay_within_the_stated_bound(models, golden, case):
    f, q = models
    ids = torch.tensor([golden[case]["input_ids"]])
    with torch.no_grad():
        a, b = f(ids).logits, q(ids).logits
    assert ((a - b).norm() / a.norm()).item() < 0.2
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() > 0.7


def test_eight_bits_are_closer_than_four(tmp_path, calib, golden):
    from workbench.gptq.quantize import quantize

    quantize(TINY_REF, calib, tmp_path / "int8", GPTQSpec(bits=8, group_size=64), samples=8)
    f, q = load_model(TINY_REF, dtype=torch.float32), load_model(tmp_path / "int8", dtype=torch.float32)
    f.image_root = q.image_root = TINY_REF
    ids = torch.tensor([golden["case3"]["input_ids"]])
    with torch.no_grad():
        a, b = f(ids).logits, q(ids).logits
    assert ((a - b).norm() / a.norm()).item() < 0.02


def test_chat_answers_on_the_int4_model(int4_model, capsys):
    assert main(["chat", "--model", str(int4_model), "--max-new-tokens", "4", "Hello"]) == 0
    assert capsys.readouterr().out.strip()


REFUSALS = [  # (what, argv change, the one line)
    ("unparsable calibration", {"--data": "bad"}, "bad.jsonl, record 0: unreadable JSON on line 1"),
    ("too few samples", {"--samples": "1000"}, "calibration sample(s), --samples asks for 1000"),
    ("group size not dividing", {"--group-size": "96"}, "--group-size: group_size 96 does not divide"),
    ("already quantized", {"--model": "int4"}, "already quantized"),
    ("bad group size", {"--group-size": "0"}, "--group-size: 0 must be positive or -1"),
]


@pytest.mark.parametrize("what,change,line", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_bad_input_is_refused_before_any_work(tmp_path, calib, int4_model, what, change, line, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    values = {"--model": str(TINY_REF), "--data": str(calib), "--out": str(tmp_path / "out"), "--samples": "32"}
    values.update({k: {"bad": str(bad), "int4": str(int4_model)}.get(v, v) for k, v in change.items()})
    assert main(["quantize", *[x for kv in values.items() for x in kv]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and line in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]  # nothing written, no temporary folder


@pytest.mark.parametrize("layout", ["sharded-bin", "sharded-safetensors"])
def test_every_source_layout_gives_the_same_export(tmp_path, calib, layout):
    import shutil

    from safetensors.torch import load_file

    from workbench.gptq.quantize import quantize

    source = tmp_path / "source"
    shutil.copytree(TINY_REF / layout, source)
    for name in ("config.json", "generation_config.json", "qwen.tiktoken", "tokenizer_config.json"):
        shutil.copy(TINY_REF / name, source / name)
    for folder, out in ((TINY_REF, "single"), (source, "sharded")):
        quantize(folder, calib, tmp_path / out, GPTQSpec(group_size=64), samples=4)
    a, b = load_file(tmp_path / "single" / "model.safetensors"), load_file(tmp_path / "sharded" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
