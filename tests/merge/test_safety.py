"""Refusals and atomicity: wrong base, existing OUT, interrupted merge, corrupt adapter, --verify."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from workbench.cli.main import main
from workbench.errors import CheckpointError, WorkbenchError
from workbench.merge import adapter as adapter_mod
from workbench.merge import merge as merge_mod
from workbench.merge import merge_adapter


@pytest.fixture(scope="module")
def other_base(tmp_path_factory):
    from workbench.demo.tiny import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("other") / "tiny", seed=1)


def test_adapter_from_another_base_is_refused_unless_forced(adapters, other_base, tmp_path):
    with pytest.raises(CheckpointError, match=r"workbench_run\.json: the adapter was trained on a different base.*--force"):
        merge_adapter(other_base, adapters("llm"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    report = merge_adapter(other_base, adapters("llm"), tmp_path / "out", force=True)
    assert report["base_fingerprint_check"].startswith("MISMATCH")


def test_existing_out_needs_overwrite(adapters, tiny_base, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(WorkbenchError, match="--overwrite"):
        merge_adapter(tiny_base, adapters("llm"), out)
    assert (out / "old.txt").exists()
    merge_adapter(tiny_base, adapters("llm"), out, overwrite=True)
    assert not (out / "old.txt").exists() and (out / "merge_report.json").exists()


def test_out_inside_base_is_refused(adapters, tiny_base):
    with pytest.raises(WorkbenchError, match="overlaps BASE"):
        merge_adapter(tiny_base, adapters("llm"), tiny_base / "merged")
    assert not (tiny_base / "merged").exists()


@pytest.mark.parametrize("had_out", [False, True])
def test_interrupted_merge_leaves_no_partial_out(had_out, adapters, tiny_base, tmp_path, monkeypatch):
    out = tmp_path / "out"
    if had_out:
        out.mkdir()
        (out / "old.txt").write_text("old")
    calls = {"n": 0}
    real = merge_mod.merge_tensor

    def failing(*args):
        calls["n"] += 1
        if calls["n"] == 30:  # mid-way: some shards' tensors are already written
            raise RuntimeError("disk full")
        return real(*args)

    monkeypatch.setattr(merge_mod, "merge_tensor", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        merge_adapter(tiny_base, adapters("llm"), out, max_shard_size="100KB", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == (["out"] if had_out else [])
    if had_out:
        assert [p.name for p in out.iterdir()] == ["old.txt"]


def test_corrupt_adapter_file_is_a_clear_error(adapters, tiny_base, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(adapters("llm"), bad)
    weights = bad / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated download
    with pytest.raises(CheckpointError, match="adapter_model.safetensors"):
        merge_adapter(tiny_base, bad, tmp_path / "out")
    code = main(["merge", "--base", str(tiny_base), "--adapter", str(bad), "--out", str(tmp_path / "out")])
    assert code == 2
    assert "adapter_model.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unreadable_adapter_config_is_a_clear_error(adapters, tiny_base, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(adapters("llm"), bad)
    (bad / "adapter_config.json").write_text('{"peft_type": "LORA", ')
    with pytest.raises(CheckpointError, match="adapter_config.json: cannot read adapter config"):
        merge_adapter(tiny_base, bad, tmp_path / "out")


def test_rank_not_matching_config_is_refused(adapters, tiny_base, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(adapters("llm"), bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    config["rank_pattern"] = {}
    config["r"] = 3
    (bad / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="rank 8 but adapter_config.json says r=3"):
        merge_adapter(tiny_base, bad, tmp_path / "out")


def test_cli_verify_passes_and_reports(adapters, tiny_base, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["merge", "--base", str(tiny_base), "--adapter", str(adapters("resampler")), "--out", str(out),
                 "--dtype", "bfloat16", "--verify"])
    assert code == 0, capsys.readouterr().err
    verify = json.loads((out / "merge_report.json").read_text())["verify"]
    assert verify["passed"] and verify["dtype"] == "bfloat16"
    assert 0 < verify["max_abs_logit_diff"] <= verify["tolerance"]
    assert "verify: max |logit diff|" in capsys.readouterr().out


def test_verify_catches_a_wrong_merge(adapters, tiny_base, tmp_path, monkeypatch):
    # Merging the MHA out_proj delta once (what a fixed PEFT would do) is not what this PEFT trained.
    monkeypatch.setattr(adapter_mod, "PEFT_MHA_OUT_PROJ_FACTOR", 1)
    with pytest.raises(WorkbenchError, match="verify failed"):
        merge_adapter(tiny_base, adapters("resampler"), tmp_path / "out", dtype=torch.float32, verify=True)
    assert list(tmp_path.iterdir()) == []


def _record_opens(monkeypatch) -> list[str]:
    """Every read of a base weight file by the merge: hashing it and loading it."""
    from workbench.model import digests

    opened: list[str] = []
    real_sha, real_load = digests.sha256_file, merge_mod.checkpoint.load_weight_file

    def sha(path):
        opened.append(f"hash {path.name}")
        return real_sha(path)

    def load(path, mmap=False):
        opened.append(f"load {path.name}")
        return real_load(path, mmap=mmap)

    monkeypatch.setattr(digests, "sha256_file", sha)
    monkeypatch.setattr(merge_mod.checkpoint, "load_weight_file", load)
    return opened


def test_wrong_base_fails_on_its_first_hash_before_any_weight_is_loaded(adapters, other_base, tmp_path,
                                                                        monkeypatch):
    adapter = adapters("llm")  # built before instrumenting: building it loads and hashes a model
    opened = _record_opens(monkeypatch)
    with pytest.raises(CheckpointError, match="different base"):
        merge_adapter(other_base, adapter, tmp_path / "out")
    assert opened == ["hash config.json", "hash model.safetensors"]  # same config, other weights


def test_each_base_file_is_hashed_and_loaded_once(adapters, tiny_base, tmp_path, monkeypatch):
    adapter = adapters("llm")
    opened = _record_opens(monkeypatch)
    report = merge_adapter(tiny_base, adapter, tmp_path / "out")
    weights = list(report["base_fingerprint"]["weights"])
    assert report["base_fingerprint_check"] == "match"
    # The fingerprint comes from the same pass as the merge: no file is read for it a second time
    # (the weight map and the specs read only the safetensors header: no tensor bytes).
    assert sorted(opened) == sorted(["hash config.json", *(f"hash {w}" for w in weights),
                                     *(f"load {w}" for w in weights)])


@pytest.fixture
def remembering(tmp_path, monkeypatch):
    """Digests remembered for every file (digests.py), in a private cache."""
    from workbench.model import digests

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(digests, "REMEMBERED_FROM", 1)
    monkeypatch.setattr(digests, "RACY_NS", 0)


def test_a_remembered_base_digest_is_read_ahead_not_hashed(adapters, tiny_base, tmp_path, monkeypatch, remembering):
    adapter = adapters("llm")
    first = merge_adapter(tiny_base, adapter, tmp_path / "first")  # hashes and remembers the base
    opened = _record_opens(monkeypatch)
    again = merge_adapter(tiny_base, adapter, tmp_path / "again")
    weights = list(again["base_fingerprint"]["weights"])
    assert again["base_fingerprint"] == first["base_fingerprint"]
    assert again["base_fingerprint_check"] == "match"
    assert sorted(opened) == sorted(["hash config.json", *(f"load {w}" for w in weights)])


def test_a_remembered_digest_of_another_base_still_fails_the_check(adapters, other_base, tmp_path, monkeypatch,
                                                                     remembering):
    from workbench.model.checkpoint import fingerprint

    adapter = adapters("llm")
    fingerprint(other_base)  # remembered, as after training on it
    opened = _record_opens(monkeypatch)
    with pytest.raises(CheckpointError, match="different base"):
        merge_adapter(other_base, adapter, tmp_path / "out")
    assert opened == ["hash config.json"]  # the weights' digest came from memory, and did not match
    assert not (tmp_path / "out").exists()



def test_maths_leave_the_hasher_a_core_and_the_thread_count_is_restored(adapters, tiny_base, tmp_path, monkeypatch):
    """While the next file is being hashed the maths run one thread fewer, then all of them again;
    the process's thread count is back to what it was after the merge, even one that fails."""
    import threading

    from workbench.model import checkpoint

    sharded = tmp_path / "sharded"  # several files: the second is hashed while the first merges
    checkpoint.save_model(dict(next(checkpoint.iter_shards(tiny_base))[1]), sharded, max_shard_size=200_000)
    checkpoint.copy_non_weight_files(tiny_base, sharded)
    files = checkpoint.shard_files(sharded)
    assert len(files) >= 2
    real_digest, real_merge = merge_mod.digest_ahead, merge_mod.merge_tensor
    hash_may_finish, seen, fail = threading.Event(), [], []

    def slow_digest(path):  # the second file's hash is still running when the first tensor merges
        if path == files[1][0]:
            hash_may_finish.wait(timeout=30)
        return real_digest(path)

    def merge_tensor(*args):
        seen.append(torch.get_num_threads())
        hash_may_finish.set()
        if fail:
            raise RuntimeError("disk full")
        return real_merge(*args)

    monkeypatch.setattr(merge_mod, "digest_ahead", slow_digest)
    monkeypatch.setattr(merge_mod, "merge_tensor", merge_tensor)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        merge_adapter(sharded, adapters("llm"), tmp_path / "out", force=True)
        assert (seen[0], seen[-1]) == (1, 2), seen  # the last file has no hash after it
        assert torch.get_num_threads() == 2
        hash_may_finish.clear()
        fail.append(True)
        with pytest.raises(RuntimeError, match="disk full"):  # fails while the maths hold one thread
            merge_adapter(sharded, adapters("llm"), tmp_path / "out2", force=True)
        assert seen[-1] == 1 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
