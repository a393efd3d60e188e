"""Peak memory of a merge is about one shard, not the model.

The loader and the writer are instrumented: every tensor a weight file is loaded into and every
tensor handed to `ShardWriter.add` is tracked with a weakref finalizer until it is freed, and the
peak of the live bytes is recorded (the writer streams each tensor to disk and keeps none). That counts exactly what the merge keeps
alive, unaffected by other processes on a shared machine (RSS is not: allocator caches, page
cache). A deliberately leaky merge checks that the measurement does see a leak.
"""

from __future__ import annotations

import weakref

import pytest
import torch

from workbench.merge import merge as merge_mod
from workbench.merge import merge_adapter
from workbench.model import checkpoint

SHARD = 60_000


class LiveTensors:
    def __init__(self) -> None:
        self.live: dict[int, int] = {}
        self.peak = 0

    def track(self, tensor: torch.Tensor) -> None:
        if id(tensor) not in self.live:
            self.live[id(tensor)] = tensor.numel() * tensor.element_size()
            weakref.finalize(tensor, self.live.pop, id(tensor), None)
            self.peak = max(self.peak, sum(self.live.values()))


def _instrument(monkeypatch, tracker: LiveTensors) -> None:
    real_load = checkpoint.load_weight_file

    def load_weight_file(path, mmap=False):
        shard = real_load(path, mmap=mmap)
        for tensor in shard.values():
            tracker.track(tensor)
        return shard

    class Writer(merge_mod.ShardWriter):
        def add(self, name, tensor):
            tracker.track(tensor)
            super().add(name, tensor)

    monkeypatch.setattr(merge_mod.checkpoint, "load_weight_file", load_weight_file)
    monkeypatch.setattr(merge_mod, "ShardWriter", Writer)


@pytest.fixture(scope="module")
def sharded_base(tmp_path_factory):
    from workbench.demo.tiny import make_tiny_model_dir

    tiny = make_tiny_model_dir(tmp_path_factory.mktemp("deep") / "tiny", num_hidden_layers=6)
    sharded = tmp_path_factory.mktemp("sharded") / "base"
    checkpoint.save_model(dict(next(checkpoint.iter_shards(tiny))[1]), sharded, max_shard_size=SHARD)
    checkpoint.copy_non_weight_files(tiny, sharded)
    return sharded


def _bounds(base_dir) -> tuple[int, int, int]:
    sizes = [t.numel() * t.element_size() for _, s in checkpoint.iter_shards(base_dir) for t in s.values()]
    shard_bytes = max(sum(t.numel() * t.element_size() for t in s.values())
                      for _, s in checkpoint.iter_shards(base_dir))
    return sum(sizes), max(sizes), shard_bytes


def test_peak_memory_is_about_one_shard(adapters, sharded_base, tmp_path, monkeypatch):
    model_bytes, largest, in_shard = _bounds(sharded_base)
    assert len(set(checkpoint.weight_map(sharded_base).values())) >= 20
    adapter = adapters("llm")  # built before instrumenting: building it loads a whole model
    tracker = LiveTensors()
    _instrument(monkeypatch, tracker)
    # The 2-layer adapter fits the first two blocks of this 6-layer base (different fingerprint).
    merge_adapter(sharded_base, adapter, tmp_path / "out", force=True, max_shard_size=SHARD)
    # the input shard + the merged tensor being written + the next one being merged
    bound = in_shard + 2 * largest
    assert 0 < tracker.peak <= bound, (tracker.peak, bound)
    assert bound < model_bytes / 4, (bound, model_bytes)  # far from "the whole model"


def test_measurement_sees_a_merge_that_keeps_everything(adapters, sharded_base, tmp_path, monkeypatch):
    kept, real, adapter = [], merge_mod.merge_tensor, adapters("llm")

    def leaky(*args):
        kept.append(real(*args))
        return kept[-1]

    tracker = LiveTensors()
    _instrument(monkeypatch, tracker)
    monkeypatch.setattr(merge_mod, "merge_tensor", leaky)
    merge_adapter(sharded_base, adapter, tmp_path / "out", force=True, max_shard_size=SHARD)
    model_bytes, _, _ = _bounds(sharded_base)
    assert tracker.peak >= model_bytes
