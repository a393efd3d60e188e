"""`workbench serve --engine vllm`: what vLLM cannot serve, or a model folder it cannot load, is one
line from the workbench before vLLM starts; the command line it starts vLLM with (no vLLM needed here:
tests/vllm run vLLM itself)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest

from workbench.cli.main import main

MODEL_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "qwen.tiktoken", "model.safetensors")


@pytest.fixture
def model(tmp_path, tiny_ref_dir) -> Path:
    out = tmp_path / "model"
    out.mkdir()
    for name in MODEL_FILES:
        shutil.copy(tiny_ref_dir / name, out / name)
    return out


def _adapter(folder: Path, **config) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, **config}))
    return folder


LLM = ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.w1"]
BAD = [  # what is wrong -> the one line that says so
    ("a ViT LoRA", dict(target_modules=[*LLM, "transformer.visual.transformer.resblocks.0.attn.in_proj"]),
     "vLLM serves LoRA on the LLM's linear layers only, and it adapts transformer.visual.transformer.resblocks.0.attn."
     "in_proj; merge it into the base (`workbench merge --base B --adapter A --out M`) and serve M"),
    ("a resampler LoRA", dict(target_modules=["transformer.visual.attn_pool.kv_proj"]), "it adapts transformer.visual"),
    ("modules_to_save", dict(target_modules=LLM, modules_to_save=["lm_head"]), "it trains whole modules (modules_to_save)"),
    ("DoRA", dict(target_modules=LLM, use_dora=True), "it uses DoRA; merge it"),
]


@pytest.mark.parametrize("what, config, message", BAD, ids=[b[0] for b in BAD])
def test_an_adapter_vllm_cannot_serve_is_refused(tmp_path, model, capsys, what, config, message):
    adapter = _adapter(tmp_path / "adapter", **config)
    assert main(["serve", "--engine", "vllm", "--model", str(model), "--adapter", f"tuned={adapter}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --adapter tuned={adapter}: " + err.split(": ", 2)[2] and message in err, err
    assert "\n" not in err


def _broken(model: Path, how: str) -> Path:
    if how == "missing folder":
        return model.parent / "nothing-here"
    if how == "no config.json":
        (model / "config.json").unlink()
    elif how == "config.json not JSON":
        (model / "config.json").write_text("{not json")
    elif how == "another architecture":
        (model / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    elif how == "no weights":
        (model / "model.safetensors").unlink()
    elif how == "no vocabulary":
        (model / "qwen.tiktoken").unlink()
    return model


BROKEN = [("missing folder", "not a folder"), ("no config.json", "no config.json; is this a model folder?"),
          ("config.json not JSON", "config.json is not valid JSON"),
          ("another architecture", "config.json is not Qwen-VL-Chat's (architectures ['LlamaForCausalLM']"),
          ("no weights", "no weights (model.safetensors"), ("no vocabulary", "no qwen.tiktoken")]


@pytest.mark.parametrize("how, message", BROKEN, ids=[b[0] for b in BROKEN])
def test_a_missing_or_broken_model_folder_is_one_line(model, capsys, how, message):
    folder = _broken(model, how)
    assert main(["serve", "--engine", "vllm", "--model", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --model {folder}: ") and message in err and "\n" not in err, err


def test_no_vllm_environment_says_how_to_make_one(model, monkeypatch, capsys, tmp_path):
    from workbench.serve import vllm_launch

    monkeypatch.delenv("WORKBENCH_VLLM_PYTHON", raising=False)
    monkeypatch.setattr(vllm_launch, "VLLM_VENV", tmp_path / "no-venv")
    monkeypatch.setattr(vllm_launch.importlib.util, "find_spec", lambda name: None)
    assert main(["serve", "--engine", "vllm", "--model", str(model)]) == 2
    assert "no vLLM environment; build it with `make vllm`" in capsys.readouterr().err


def test_the_vllm_command_line(model, tmp_path, monkeypatch):
    from workbench.serve.vllm_launch import vllm_command

    monkeypatch.setenv("WORKBENCH_VLLM_PYTHON", "/opt/vllm/bin/python")
    args = argparse.Namespace(model=str(model), name=None, host="127.0.0.1", port=8123, dtype="float32", api_key=None,
                              max_model_len=None, max_images=4, vllm_arg=["--tensor-parallel-size", "2"])
    cmd = vllm_command(args, json.loads((model / "config.json").read_text()), tmp_path / "tok",
                       {"a": tmp_path / "a", "b": tmp_path / "b"}, [8, 16])
    assert cmd[:3] == ["/opt/vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    flags = dict(zip(cmd[3::1], cmd[4::1]))
    assert flags["--model"] == str(model) and flags["--served-model-name"] == "model"
    assert flags["--max-model-len"] == "2048"  # the config's seq_length: no NTK / log-n in vLLM
    assert flags["--tokenizer"] == flags["--generation-config"] == str(tmp_path / "tok") and flags["--dtype"] == "float32"
    assert flags["--max-lora-rank"] == "16" and flags["--max-loras"] == "2"
    assert cmd[cmd.index("--lora-modules") + 1:cmd.index("--lora-modules") + 3] == [f"a={tmp_path / 'a'}",
                                                                                     f"b={tmp_path / 'b'}"]
    assert cmd[-2:] == ["--tensor-parallel-size", "2"] and "--enable-lora" in cmd
    assert json.loads(flags["--media-io-kwargs"]) == {"image": {"image_mode": None}}
