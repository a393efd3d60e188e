"""The streaming safetensors writer: shard plans, headers safetensors itself reads, plan order enforced."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from workbench.model.shard_writer import ShardWriter, TensorSpec, plan_shards, read_safetensors_specs


def spec(name: str, nbytes: int) -> TensorSpec:
    return TensorSpec(name, torch.uint8, (nbytes,))


PLAN_CASES = [  # (tensor sizes, max shard size, expected shard sizes)
    ([4, 4, 4], 8, [[4, 4], [4]]),
    ([4, 4, 4], 12, [[4, 4, 4]]),
    ([10, 2, 2], 8, [[10], [2, 2]]),      # a tensor bigger than a shard goes alone
    ([2, 10, 2], 8, [[2], [10], [2]]),
    ([], 8, [[]]),                          # an empty model still gets one (empty) shard
]


@pytest.mark.parametrize("sizes,max_size,expected", PLAN_CASES)
def test_plan_shards(sizes, max_size, expected):
    plan = plan_shards([spec(f"t{i}", n) for i, n in enumerate(sizes)], max_size)
    assert [[s.nbytes for s in shard] for shard in plan] == expected


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(3, 5, generator=g).to(torch.bfloat16),
            "b.bias": torch.randn(7, generator=g),
            "c.ids": torch.arange(6, dtype=torch.int64).view(2, 3),
            "d.mask": torch.tensor([True, False, True]),
            "e.scalar": torch.tensor(2.5, dtype=torch.float16),
            "f.view": torch.randn(4, 4, generator=g)[:, 1]}  # non-contiguous view of a bigger storage


@pytest.mark.parametrize("max_size,n_files", [(10_000, 1), (40, 4)])
def test_written_files_read_back_exactly(tmp_path, max_size, n_files):
    state = _state()
    writer = ShardWriter(tmp_path, [TensorSpec.of(k, t) for k, t in state.items()], max_size)
    for k, t in state.items():
        writer.add(k, t)
    index = writer.close()
    files = sorted(tmp_path.glob("model*.safetensors"))
    assert len(files) == n_files and not list(tmp_path.glob(".tmp-*"))
    back = {k: v for f in files for k, v in load_file(f).items()}
    assert back.keys() == state.keys()
    for k, t in state.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k
    assert set(index["weight_map"]) == set(state)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    with safe_open(files[0], framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert [s.name for f in files for s in read_safetensors_specs(f)] == list(state)
    assert (tmp_path / "model.safetensors.index.json").exists() == (n_files > 1)


BAD_ORDER_CASES = [  # (what is added, error fragment)
    ([("b.bias", None)], "expected a.weight"),
    ([("a.weight", torch.zeros(3, 5))], "torch.bfloat16"),            # wrong dtype
    ([("a.weight", torch.zeros(5, 3, dtype=torch.bfloat16))], "[3, 5]"),  # wrong shape
]


@pytest.mark.parametrize("added,fragment", BAD_ORDER_CASES)
def test_tensor_out_of_plan_is_refused(tmp_path, added, fragment):
    state = _state()
    writer = ShardWriter(tmp_path, [TensorSpec.of(k, t) for k, t in state.items()], 10_000)
    with pytest.raises(ValueError, match="expected") as err:
        for name, tensor in added:
            writer.add(name, state[name] if tensor is None else tensor)
    assert fragment in str(err.value)


def test_close_refuses_missing_tensors(tmp_path):
    state = _state()
    writer = ShardWriter(tmp_path, [TensorSpec.of(k, t) for k, t in state.items()], 10_000)
    writer.add("a.weight", state["a.weight"])
    with pytest.raises(ValueError, match="5 planned tensor"):
        writer.close()
    assert not list(tmp_path.glob("model*"))  # nothing under a release name
