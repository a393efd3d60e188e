"""QWenConfig reads the release config.json as is and writes it back unchanged."""

from __future__ import annotations

import json

import pytest
import torch

from workbench.errors import CheckpointError
from workbench.model.config import QWenConfig, load_config, precision_dtype


@pytest.mark.parametrize("which", ["real_ref_dir", "tiny_ref_dir"])
def test_config_round_trip_is_key_by_key_identical(which, request, tmp_path):
    src = request.getfixturevalue(which) / "config.json"
    config = load_config(src.parent)
    config.save_pretrained(tmp_path)
    original, saved = json.loads(src.read_text()), json.loads((tmp_path / "config.json").read_text())
    assert sorted(saved) == sorted(original)  # no transformers-added keys, none lost
    for key in original:
        assert saved[key] == original[key], key


def test_config_values(real_ref_dir):
    config = load_config(real_ref_dir)
    assert (config.hidden_size, config.kv_channels, config.intermediate_size) == (4096, 128, 22016)
    assert config.visual["image_start_id"] == 151857 and config.image_start_id == 151857
    assert config.dtype == torch.bfloat16


def test_not_qwen_vl_configs_name_the_file(tmp_path, tiny_ref_dir):
    raw = json.loads((tiny_ref_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match=r"config\.json.*model_type is 'llama'"):
        load_config(tmp_path)
    del raw["visual"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"config\.json.*no 'visual' block"):
        load_config(tmp_path)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_config(tmp_path / "nowhere")


def test_precision_flags():
    assert precision_dtype(QWenConfig(fp32=True)) == torch.float32
    assert precision_dtype(QWenConfig(bf16=True)) == torch.bfloat16
    assert precision_dtype(QWenConfig(fp16=True)) == torch.float16
    with pytest.raises(CheckpointError, match="at most one"):
        precision_dtype(QWenConfig(bf16=True, fp16=True))
    if not torch.cuda.is_available():
        assert precision_dtype(QWenConfig()) == torch.float32  # all flags false on a CPU box
