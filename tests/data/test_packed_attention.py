"""Packed batches attend inside each segment without a dense [L, L] mask (model/qwen.py Segments).

The tiny reference model in float32, train mode, case8's first four samples (51 text-only, 367 with
one image, 593 with two images, 109 text-only tokens): the packed batch's loss and every gradient
equal those of the samples run one by one, and no tensor of the row length squared is made.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from workbench.data.collator import SFTCollator
from workbench.data.config import DataConfig
from workbench.data.dataset import load_sft_data
from workbench.model.modeling import IGNORE_INDEX
from workbench.model.qwen import Segments

PAD = 511

# (name, max_length, pad_to_multiple_of, expected rows): every layout has images; all but one padding.
LAYOUTS = [
    ("two rows, one padded", 1100, None, [[0, 1, 2], [3]]),
    ("one full row, no padding", 1200, None, [[0, 1, 2, 3]]),
    ("three rows padded to 64", 700, 64, [[0, 1], [2], [3]]),
]


class ShapeRecorder(TorchDispatchMode):
    """Every shape any aten op produces (forward and backward) while active."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes += [tuple(t.shape) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out

    def square(self, length: int) -> list[tuple[int, ...]]:
        return [s for s in self.shapes if len(s) >= 2 and s[-2:] == (length, length)]


@pytest.fixture(scope="module")
def model(tiny_ref_dir):
    from workbench import load_model

    model = load_model(tiny_ref_dir, dtype=torch.float32)
    model.train()  # dropout is 0 in the tiny config; train mode is the path packing runs on
    return model


@pytest.fixture
def data(tok, golden, write_data):
    path = write_data([{"conversations": s["conversations"]} for s in golden["case8"]["sources"][:4]])

    def load(**extra):
        return load_sft_data(DataConfig.from_dict({"train": str(path), **extra}), tok, 56).train
    return load


def _loss_and_grads(model, batches_and_weights):
    model.zero_grad(set_to_none=True)
    total = sum(model(**batch).loss * w for batch, w in batches_and_weights)
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return total.detach(), grads


def _tokens(labels: torch.Tensor) -> int:
    return int(labels[..., 1:].ne(IGNORE_INDEX).sum())


@pytest.mark.parametrize("name, max_length, multiple, rows", LAYOUTS, ids=[row[0] for row in LAYOUTS])
def test_packed_loss_and_grads_equal_one_by_one(model, data, name, max_length, multiple, rows):
    packed = data(packing=True, max_length=max_length)
    assert packed.rows == rows
    batch = SFTCollator(PAD, multiple)([packed[i] for i in range(len(packed))])
    assert batch["pixel_values"].shape[0] == 3
    alone = data(max_length=max_length)
    singles = [SFTCollator(PAD)([alone[i]]) for i in range(len(alone))]
    n = sum(_tokens(b["labels"]) for b in singles)
    assert _tokens(batch["labels"]) == n

    loss, grads = _loss_and_grads(model, [(batch, 1.0)])
    ref_loss, ref_grads = _loss_and_grads(model, [(b, _tokens(b["labels"]) / n) for b in singles])
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for key in grads:
        torch.testing.assert_close(grads[key], ref_grads[key], rtol=1e-5, atol=1e-5, msg=key)


def test_packed_forward_and_backward_build_no_square_tensor(model, data):
    packed = data(packing=True, max_length=700)
    batch = SFTCollator(PAD, 64)([packed[i] for i in range(len(packed))])
    width = batch["input_ids"].shape[1]
    assert width == 640  # longer than any segment, so an [L, L] tensor can only be a mask
    recorder = ShapeRecorder()
    with recorder:
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    assert len(recorder.shapes) > 100  # the mode saw the ops
    assert recorder.square(width) == []


def test_the_detector_catches_the_padded_batch_mask(model, data):
    """Control: an unpacked padded batch still uses the release's dense additive mask [B,1,L,L]."""
    alone = data(max_length=700)
    batch = SFTCollator(PAD)([alone[0], alone[1]])
    width = batch["input_ids"].shape[1]
    recorder = ShapeRecorder()
    with recorder, torch.no_grad():
        model(**batch)
    assert (2, 1, width, width) in recorder.square(width)


@pytest.mark.parametrize("flip", [(0, 3), (0, 8)], ids=["mask 0 inside a segment", "mask 1 on padding"])
def test_attention_mask_disagreeing_with_segments_is_refused(model, flip):
    segments = torch.tensor([[1, 1, 1, 2, 2, 0, 0, 0, 0]])
    mask = (segments > 0).long()
    mask[flip] = 1 - mask[flip]
    with pytest.raises(ValueError, match="attention_mask disagrees with segment_ids"):
        model(torch.full_like(segments, 30), attention_mask=mask, segment_ids=segments)


@pytest.mark.parametrize("ids, runs", [
    ([[1, 1, 2, 2, 2, 0]], (((0, 2), (2, 3), (5, 1)),)),
    ([[1, 2, 3], [1, 1, 0]], (((0, 1), (1, 1), (2, 1)), ((0, 2), (2, 1)))),
])
def test_segments_runs_and_groups(ids, runs):
    seg = Segments.from_ids(torch.tensor(ids))
    assert seg.runs == runs
    flat = torch.cat([g.flatten() for g in seg.groups.values()])
    assert sorted(flat.tolist()) == list(range(len(ids) * len(ids[0])))  # every position in one run
    assert flat[seg.inverse].tolist() == list(range(flat.numel()))
    lengths = [n for row in runs for _, n in row]
    assert seg.cu_seqlens.tolist() == [sum(lengths[:i]) for i in range(len(lengths) + 1)]
