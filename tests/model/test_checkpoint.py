"""Checkpoint layouts, strict loading, sharded saving, fingerprints."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from workbench import load_model
from workbench.errors import CheckpointError
from workbench.model.checkpoint import (
    copy_non_weight_files,
    fingerprint,
    iter_shards,
    parse_size,
    save_model,
    weight_map,
)
from workbench.model.config import load_config
from workbench.model.modeling import QWenLMHeadModel

NON_WEIGHT_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "qwen.tiktoken")


@pytest.fixture(scope="module")
def reference(tiny_ref_dir):
    return load_file(tiny_ref_dir / "model.safetensors")


def linked_folder(tmp_path, tiny_ref_dir, weights_subdir=None):
    """A model folder: the reference's non-weight files linked, plus the weights of one layout."""
    folder = tmp_path / "model"
    folder.mkdir()
    for name in NON_WEIGHT_FILES:
        os.symlink(tiny_ref_dir / name, folder / name)
    if weights_subdir is not None:
        for path in (tiny_ref_dir / weights_subdir).iterdir():
            os.symlink(path, folder / path.name)
    return folder


def assert_same_weights(model, reference):
    state = model.state_dict()
    assert sorted(state) == sorted(reference)
    for key, tensor in reference.items():
        assert state[key].dtype == tensor.dtype and torch.equal(state[key], tensor), key


def test_full_size_model_on_meta_matches_the_release_index(real_ref_dir):
    config = load_config(real_ref_dir)
    with torch.device("meta"):
        model = QWenLMHeadModel(config)
    state = model.state_dict()
    index = json.loads((real_ref_dir / "pytorch_model.bin.index.json").read_text())
    shapes = json.loads((real_ref_dir / "key_shapes.json").read_text())
    assert len(state) == 853 and set(state) == set(index["weight_map"]) == set(shapes)
    assert {k: list(v.shape) for k, v in state.items()} == shapes
    assert sum(math.prod(s) * 2 for s in shapes.values()) == index["metadata"]["total_size"]
    assert list(state) == list(shapes)  # the release's state_dict order too


@pytest.mark.parametrize("subdir", ["sharded-safetensors", "sharded-bin"])
def test_load_reference_sharded_layouts(tmp_path, tiny_ref_dir, reference, subdir):
    model = load_model(linked_folder(tmp_path, tiny_ref_dir, subdir))
    assert not model.training and model.dtype == torch.float32  # config says fp32
    assert not model.transformer.visual.attn_pool.pos_embed.requires_grad
    assert_same_weights(model, reference)


def test_dtype_argument_wins(tiny_ref_dir, reference):
    model = load_model(tiny_ref_dir, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.equal(model.lm_head.weight, reference["lm_head.weight"].bfloat16())


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_save_in_shards_and_reload(tmp_path, tiny_ref_dir, reference, layout):
    model = load_model(tiny_ref_dir)
    out = tmp_path / "saved"
    index = save_model(model, out, max_shard_size="800KB", layout=layout)
    for name in NON_WEIGHT_FILES[2:]:
        shutil.copy(tiny_ref_dir / name, out)
    stem, ext, index_name = (("model", "safetensors", "model.safetensors.index.json") if layout == "safetensors"
                             else ("pytorch_model", "bin", "pytorch_model.bin.index.json"))
    shards = sorted(p.name for p in out.glob(f"*.{ext}"))
    n = len(shards)
    assert n > 2 and shards == [f"{stem}-{i:05d}-of-{n:05d}.{ext}" for i in range(1, n + 1)]
    assert json.loads((out / index_name).read_text()) == index
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in reference.values())
    assert set(index["weight_map"]) == set(reference) and set(index["weight_map"].values()) == set(shards)
    assert not list(out.glob(".*"))  # no temporary files left behind
    for path, tensors in iter_shards(out):
        assert all(index["weight_map"][k] == path.name for k in tensors)
    assert_same_weights(load_model(out), reference)
    saved_config = json.loads((out / "config.json").read_text())
    assert saved_config == json.loads((tiny_ref_dir / "config.json").read_text())


def test_save_bf16_writes_bf16_and_says_so(tmp_path, tiny_ref_dir, reference):
    save_model(load_model(tiny_ref_dir), tmp_path, dtype=torch.bfloat16)
    weights = load_file(tmp_path / "model.safetensors")
    assert torch.equal(weights["transformer.wte.weight"], reference["transformer.wte.weight"].bfloat16())
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_missing_and_unexpected_keys_are_named(tmp_path, tiny_ref_dir, reference):
    folder = linked_folder(tmp_path, tiny_ref_dir)
    broken = dict(reference)
    del broken["transformer.h.1.mlp.w2.weight"]
    broken["transformer.h.9.extra.weight"] = torch.zeros(2)
    save_file(broken, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\): transformer\.h\.1\.mlp\.w2\.weight; "
                                              r"1 unexpected key\(s\): transformer\.h\.9\.extra\.weight"):
        load_model(folder)


def test_wrong_shape_is_named(tmp_path, tiny_ref_dir, reference):
    folder = linked_folder(tmp_path, tiny_ref_dir)
    save_file({**reference, "transformer.ln_f.weight": torch.ones(64)}, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"transformer\.ln_f\.weight has shape \[64\], the config expects \[128\]"):
        load_model(folder)


@pytest.mark.parametrize("subdir", ["sharded-safetensors", "sharded-bin"])
def test_truncated_shard_names_the_file(tmp_path, tiny_ref_dir, subdir):
    folder = linked_folder(tmp_path, tiny_ref_dir, subdir)
    shard = sorted(p for p in folder.iterdir() if p.name.endswith(("-00002.bin", "-00002.safetensors")))[0]
    data = shard.read_bytes()
    shard.unlink()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{shard.name}: cannot read weight file"):
        load_model(folder)


def test_no_weights_and_not_a_folder(tmp_path, tiny_ref_dir):
    with pytest.raises(CheckpointError, match="no weights found"):
        weight_map(linked_folder(tmp_path, tiny_ref_dir))
    with pytest.raises(CheckpointError, match="is a file"):
        load_model(tiny_ref_dir / "config.json")


def test_fingerprint_and_copy(tmp_path, tiny_ref_dir):
    import hashlib

    fp = fingerprint(tiny_ref_dir)
    assert fp["config_sha256"] == hashlib.sha256((tiny_ref_dir / "config.json").read_bytes()).hexdigest()
    assert fp["weights"] == {"model.safetensors":
                             hashlib.sha256((tiny_ref_dir / "model.safetensors").read_bytes()).hexdigest()}
    copied = copy_non_weight_files(tiny_ref_dir, tmp_path)
    assert set(copied) == {"golden.json", *NON_WEIGHT_FILES}
    assert not list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob(".*"))
    (tmp_path / "model.safetensors").write_bytes((tiny_ref_dir / "model.safetensors").read_bytes()[:-1] + b" ")
    assert fingerprint(tmp_path)["weights"]["model.safetensors"] != fp["weights"]["model.safetensors"]


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1GiB") == 2**30 and parse_size(512) == 512
    with pytest.raises(ValueError):
        parse_size("two gigs")


def _with(value: float, dtype: torch.dtype, n: int = 1000) -> torch.Tensor:
    t = torch.full((n,), 0.5, dtype=dtype)
    t[n // 2] = value
    return t


FINITE_CASES = [  # (tensor, all finite?)
    (torch.full((1000,), 60000.0, dtype=torch.float16), True),  # the sum overflows fp16: exact path
    (_with(float("nan"), torch.bfloat16), False),
    (_with(float("inf"), torch.float16), False),
    (torch.tensor([float("inf"), float("-inf"), 1.0]), False),   # inf - inf = NaN in the sum
    (_with(-1e30, torch.float32), True),
    (_with(float("-inf"), torch.float32, n=(1 << 24) + 5), False),  # longer than one chunk
]


@pytest.mark.parametrize("tensor,finite", FINITE_CASES)
def test_check_finite(tensor, finite):
    from workbench.model.checkpoint import check_finite

    if finite:
        check_finite({"w": tensor}, "f")
    else:
        with pytest.raises(CheckpointError, match="f: tensor w holds NaN or inf"):
            check_finite({"w": tensor}, "f")


@pytest.mark.parametrize("sendfile_works", [True, False])
def test_read_through_reads_every_byte_once(tmp_path, monkeypatch, sendfile_works):
    from workbench.model.checkpoint import read_through

    path = tmp_path / "w.bin"
    path.write_bytes(os.urandom(3 * (1 << 20) + 123))
    read, real_sendfile, real_readv = [], os.sendfile, os.readv

    def sendfile(out, fd, offset, count):
        if not sendfile_works:
            raise OSError(22, "Invalid argument")
        sent = real_sendfile(out, fd, offset, count)
        read.append(sent)
        return sent

    def readv(fd, buffers):
        n = real_readv(fd, buffers)
        read.append(n)
        return n

    monkeypatch.setattr(os, "sendfile", sendfile)
    monkeypatch.setattr(os, "readv", readv)
    read_through(path)
    assert sum(read) == path.stat().st_size
    read_through(tmp_path / "missing.bin")  # left for the loader to report
