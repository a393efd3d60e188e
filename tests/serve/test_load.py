"""Load on 127.0.0.1, bounded in count and time: 32 concurrent clients x 4 requests, every one answered,
each greedy answer equal to the same request served alone; rows of several adapters share batches."""

from __future__ import annotations

from PIL import Image

from tests.serve.conftest import data_url, user
from workbench.serve.bench import run_clients

CLIENTS, REQUESTS = 32, 4


def _specs(images_dir) -> list[dict]:
    red, stripes = (data_url(Image.open(images_dir / name)) for name in ("red.png", "stripes.png"))
    history = [{"role": "system", "content": "Answer in one line."}, {"role": "user", "content": "Hi!"},
               {"role": "assistant", "content": "Hello."}, {"role": "user", "content": [
                   {"type": "image_url", "image_url": {"url": red}}, {"type": "text", "text": "And this?"}]}]
    specs = [
        ("tiny", [{"role": "user", "content": "Tell me about the weather."}], 12, None),
        ("llm", user(("image", red), "What colour is this?"), 16, None),
        ("llm2", [{"role": "user", "content": "Write a haiku about batching."}], 20, None),
        ("tiny", user(("image", stripes), "Describe the stripes."), 8, None),
        ("llm", [{"role": "user", "content": "Count to ten, please."}], 24, ["x", "y"]),
        ("llm2", user(("image", stripes), ("image", red), "Which one is red?"), 10, None),
        ("tiny", history, 14, None),
        ("llm", user("A longer question " * 12, ("image", red)), 6, None),
    ]
    return [{"model": m, "messages": msgs, "max_tokens": n, "temperature": 0, **({"stop": s} if s else {})}
            for m, msgs, n, s in specs]


def _answer(reply) -> tuple:
    choice = reply.choices[0]
    return choice.message.content, choice.finish_reason, reply.usage.completion_tokens


def test_32_clients_get_the_answers_each_gets_alone(mixed_server, images_dir):
    specs = _specs(images_dir)
    alone = [_answer(r) for r in run_clients(mixed_server.url, [specs], timeout_s=120)[0][0]]  # one at a time
    assert len(set(alone)) == len(specs)  # every request has its own answer
    engine = mixed_server.engine
    before = dict(engine.stats)

    workload = [[specs[(c * REQUESTS + r) % len(specs)] for r in range(REQUESTS)] for c in range(CLIENTS)]
    replies, latencies = run_clients(mixed_server.url, workload, timeout_s=240)

    assert len(latencies) == CLIENTS * REQUESTS
    for c, client in enumerate(replies):
        for r, reply in enumerate(client):
            assert _answer(reply) == alone[(c * REQUESTS + r) % len(specs)], (c, r)
    # It was batched: more than one row per forward, rows of different adapters in one batch.
    assert engine.stats["max_rows"] > 1 and engine.stats["mixed_batches"] > before["mixed_batches"]
    assert engine.stats["batches"] - before["batches"] < CLIENTS * REQUESTS
    assert engine.stats["joined"] > before["joined"]  # requests also joined batches already running
    assert engine.queued == 0 and engine.running == 0
