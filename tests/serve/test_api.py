"""The official `openai` client against the server on 127.0.0.1: text, image, streaming, adapters by
name, each greedy answer the same as `workbench chat` prints for the same prompt."""

from __future__ import annotations

import httpx
import pytest
from PIL import Image

from tests.serve.conftest import data_url, user
from workbench.cli.main import main

TEXT = "Tell me about the weather."
QUESTION = "What is in this picture?"


def workbench_chat(capsys, model_dir, question, max_new_tokens, image=None, adapter=None) -> str:
    """What `workbench chat` prints for one question (the answer and a newline)."""
    capsys.readouterr()
    argv = ["chat", "--model", str(model_dir), "--max-new-tokens", str(max_new_tokens), "--device", "cpu"]
    argv += ["--image", str(image)] * (image is not None) + ["--adapter", str(adapter)] * (adapter is not None)
    assert main([*argv, question]) == 0
    return capsys.readouterr().out


def ask(client, model, messages, max_tokens=16, **kwargs):
    return client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=max_tokens,
                                          **kwargs)


def test_models_and_health(mixed_server, client_for):
    client = client_for(mixed_server)
    models = {m.id: m for m in client.models.list().data}
    assert list(models) == ["tiny", "llm", "llm2"]
    assert models["llm"].model_extra["parent"] == "tiny" and models["tiny"].model_extra["parent"] is None
    health = httpx.get(mixed_server.url + "/health").json()
    assert health.pop("stats") == mixed_server.engine.stats
    assert health == {"status": "ok", "model": "tiny", "adapters": ["llm", "llm2"], "batching": "mixed",
                      "queued": 0, "running": 0}


def test_text_answer_is_workbench_chats(mixed_server, client_for, tiny_dir, capsys):
    reply = ask(client_for(mixed_server), "tiny", [{"role": "user", "content": TEXT}], max_tokens=24)
    choice = reply.choices[0]
    assert choice.message.content and choice.message.content + "\n" == workbench_chat(capsys, tiny_dir, TEXT, 24)
    assert choice.finish_reason in ("stop", "length") and reply.model == "tiny"
    assert reply.usage.completion_tokens <= 24 and reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_image_answer_is_workbench_chats(mixed_server, client_for, tiny_dir, images_dir, capsys):
    image = images_dir / "stripes.png"
    reply = ask(client_for(mixed_server), "tiny", user(("image", data_url(Image.open(image))), QUESTION))
    expected = workbench_chat(capsys, tiny_dir, QUESTION, 16, image=image)
    assert reply.choices[0].message.content + "\n" == expected
    # The answer depends on the picture: another image gives another answer.
    other = ask(client_for(mixed_server), "tiny", user(("image", data_url(Image.open(images_dir / "red.png"))), QUESTION))
    assert other.choices[0].message.content != reply.choices[0].message.content
    assert reply.usage.prompt_tokens == other.usage.prompt_tokens > 258  # the image span counts


def test_streamed_answer_is_the_same_answer(mixed_server, client_for, images_dir):
    client = client_for(mixed_server)
    messages = user(("image", data_url(Image.open(images_dir / "red.png"))), QUESTION)
    whole = ask(client, "llm", messages, max_tokens=20)
    chunks = list(ask(client, "llm", messages, max_tokens=20, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and text == whole.choices[0].message.content
    last = [c for c in chunks if c.choices][-1].choices[0]
    assert last.finish_reason == whole.choices[0].finish_reason and last.model_extra["boxes"] == []
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


@pytest.mark.parametrize("server, adapter", [("mixed_server", "llm"), ("grouped_server", "all"), ("grouped_server", "llm")])
def test_adapter_by_name_is_workbench_chat_adapter(request, server, adapter, client_for, tiny_dir, adapter_dirs,
                                                    images_dir, capsys):
    server = request.getfixturevalue(server)
    image = images_dir / "stripes.png"
    reply = ask(client_for(server), adapter, user(("image", data_url(Image.open(image))), QUESTION))
    expected = workbench_chat(capsys, tiny_dir, QUESTION, 16, image=image, adapter=adapter_dirs[adapter])
    assert reply.choices[0].message.content + "\n" == expected
    base = ask(client_for(server), "tiny", user(("image", data_url(Image.open(image))), QUESTION))
    assert base.choices[0].message.content != reply.choices[0].message.content  # the adapter changes answers


def test_base_answers_unchanged_by_an_adapter_that_replaces_norms(grouped_server, client_for, tiny_dir, images_dir,
                                                                 capsys):
    """`all` trains ln_pre and ln_f fully; PEFT loads them into the base, the server swaps them back out."""
    image = images_dir / "red.png"
    client = client_for(grouped_server)
    ask(client, "all", [{"role": "user", "content": TEXT}])  # the adapter's norms in, then out again
    reply = ask(client, "tiny", user(("image", data_url(Image.open(image))), QUESTION))
    assert reply.choices[0].message.content + "\n" == workbench_chat(capsys, tiny_dir, QUESTION, 16, image=image)


def test_sampling_with_a_seed_repeats(mixed_server, client_for):
    client = client_for(mixed_server)

    def sample(seed):
        reply = client.chat.completions.create(model="llm", messages=[{"role": "user", "content": TEXT}], n=2,
                                               temperature=1.0, top_p=0.9, seed=seed, max_tokens=24)
        return [c.message.content for c in reply.choices]

    first = sample(7)
    assert sample(7) == first and first[0] != first[1]  # choice i samples with seed + i
    assert sample(8)[0] == first[1]


def test_stop_sequence_ends_the_answer(mixed_server, client_for):
    client = client_for(mixed_server)
    full = ask(client, "tiny", [{"role": "user", "content": TEXT}], max_tokens=24).choices[0]
    stop = full.message.content[3:5]
    cut = ask(client, "tiny", [{"role": "user", "content": TEXT}], max_tokens=24, stop=[stop, "never"]).choices[0]
    assert cut.message.content == full.message.content[:full.message.content.index(stop)]
    assert cut.finish_reason == "stop"
    streamed = ask(client, "tiny", [{"role": "user", "content": TEXT}], max_tokens=24, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == cut.message.content


def test_boxes_of_the_answer_in_pixels(box_server, client_for, demo_sample):
    client = client_for(box_server)
    image = Image.open(demo_sample.image)
    reply = ask(client, "demo", user(("image", data_url(image)), f"Where is {demo_sample.ref}?"), max_tokens=32)
    choice = reply.choices[0]
    assert choice.message.content == demo_sample.answer and choice.finish_reason == "stop"
    (w, h), (x1, y1, x2, y2) = image.size, demo_sample.grid
    assert choice.model_extra["boxes"] == [{"ref": demo_sample.ref, "box": [x1, y1, x2, y2],
                                            "pixels": [round(v / 1000 * s, 2) for v, s in
                                                       zip((x1, y1, x2, y2), (w, h, w, h))]}]
    chunks = [c for c in ask(client, "demo", user(("image", data_url(image)), "Where?"), stream=True) if c.choices]
    first = next(i for i, c in enumerate(chunks) if c.choices[0].model_extra.get("boxes"))
    assert chunks[first].choices[0].model_extra["boxes"] == choice.model_extra["boxes"]
    assert chunks[first].choices[0].delta.content.endswith("</box>")  # sent as soon as the box is complete
    assert chunks[-1].choices[0].model_extra["boxes"] == choice.model_extra["boxes"]  # and with the last chunk
    no_image = ask(client, "demo", [{"role": "user", "content": "Where?"}])
    assert no_image.choices[0].model_extra["boxes"][0]["pixels"] is None
