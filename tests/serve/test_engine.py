"""The scheduler's choices (which rows share a batch, who may join) and the sampler's nucleus."""

from __future__ import annotations

import pytest
import torch

from workbench.serve.engine import Batch, Engine, QueueFull, Row, Sampling, sample


@pytest.fixture(scope="module")
def served(tiny_dir, adapter_dirs):
    from workbench.serve.models import ServedModel

    return ServedModel.load(str(tiny_dir), {"all": adapter_dirs["all"], "llm": adapter_dirs["llm"]}, device="cpu")


def _row(length: int, adapter=None, max_tokens=8) -> Row:
    return Row(list(range(10, 10 + length)), None, adapter, Sampling(max_tokens), lambda event: None)


def test_keys_follow_what_peft_can_mix(served, tiny_dir, adapter_dirs):
    from workbench.serve.models import ServedModel

    # `all` has LoRA on the ViT: nothing mixes, every adapter (and the base) gets its own batches.
    assert served.mode == "grouped"
    assert [served.batch_key(a) for a in (None, "llm", "all")] == ["__base__", "llm", "all"]
    assert set(served.adapters["all"].replaced) >= {"transformer.ln_f.weight", "transformer.visual.ln_pre.weight"}
    mixed = ServedModel.load(str(tiny_dir), {"llm": adapter_dirs["llm"], "llm2": adapter_dirs["llm2"]}, device="cpu")
    assert mixed.mode == "mixed" and {mixed.batch_key(a) for a in (None, "llm", "llm2")} == {"*"}
    assert mixed.activate("*", ["llm", None, "llm2"]) == {"adapter_names": ["llm", "__base__", "llm2"]}
    assert mixed.activate("*", ["llm", "llm"]) == {}  # one adapter: the plain forward


# (rows as (prompt length, adapter, max_tokens), max_batch, seq_length) -> indices of the rows in the first batch
FIRST_BATCH = {
    "all that fit": ([(5, None, 8), (9, None, 8), (3, None, 8)], 8, 2048, [0, 1, 2]),
    "max_batch": ([(5, None, 8)] * 5, 2, 2048, [0, 1]),
    "the oldest row's adapter": ([(5, "llm", 8), (5, None, 8), (6, "llm", 8), (7, "all", 8)], 8, 2048, [0, 2]),
    "width + answer past seq_length": ([(20, None, 8), (40, None, 30), (30, None, 10)], 8, 64, [0, 2]),
    "a long row alone": ([(60, None, 30), (5, None, 8)], 8, 64, [0]),
}


@pytest.mark.parametrize("name", FIRST_BATCH)
def test_first_batch(served, name):
    specs, max_batch, seq_length, expected = FIRST_BATCH[name]
    engine = Engine(served, max_batch=max_batch)
    engine.seq_length = seq_length
    rows = [_row(n, a, t) for n, a, t in specs]
    engine.submit(rows)
    assert engine._take(None) == [rows[i] for i in expected]
    assert engine.queued == len(rows) - len(expected)


def test_joining_a_running_batch(served):
    engine = Engine(served, max_batch=3)
    engine.seq_length = 64
    running = Batch([_row(10)], cache=None, mask=torch.ones(1, 12, dtype=torch.long), key="__base__")
    short, other, longer, after = _row(8), _row(8, "llm"), _row(13), _row(4)
    engine.submit([short, after])
    assert engine._take(running) == [short, after]  # prompts no longer than the cache join
    engine.submit([longer, _row(4)])
    assert engine._take(running) == []  # the oldest waits for the batch to end, nobody overtakes it
    engine._pending.clear()
    engine.submit([other])
    assert engine._take(running) == []  # another adapter's batch
    engine._pending.clear()
    engine.submit([_row(8, max_tokens=60)])
    assert engine._take(running) == []  # 12 + 60 would pass seq_length 64


def test_queue_is_bounded_and_all_or_nothing(served):
    engine = Engine(served, max_queue=3)
    engine.submit([_row(4), _row(4)])
    with pytest.raises(QueueFull, match="2 rows are queued"):
        engine.submit([_row(4), _row(4)])
    assert engine.queued == 2
    first = engine._pending[0]
    engine.cancel([first])
    assert engine.queued == 1 and first.cancelled and engine.stats["cancelled"] == 1


def test_top_p_keeps_the_smallest_set_that_reaches_it():
    logits = torch.tensor([0.5, 0.3, 0.2, 0.0]).log()
    generator = torch.Generator().manual_seed(0)
    draws = [sample(logits, 1.0, 0.6, generator) for _ in range(2000)]
    assert set(draws) == {0, 1}  # 0.5 < 0.6, so the second token is needed; the third is not
    assert abs(draws.count(0) / 2000 - 0.5 / 0.8) < 0.04  # renormalised over the nucleus
    assert {sample(logits, 1.0, 0.5, generator) for _ in range(200)} == {0}
    assert {sample(logits, 1.0, 1.0, generator) for _ in range(2000)} == {0, 1, 2}
    hot = [sample(logits, 100.0, 1.0, generator) for _ in range(2000)]  # a high temperature flattens
    assert abs(hot.count(2) / 2000 - 1 / 3) < 0.05
