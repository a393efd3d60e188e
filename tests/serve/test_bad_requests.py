"""Bad requests: each a 4xx in OpenAI's error shape with a message that says what is wrong, and the
server answers a good request right after each; a full queue is a 503; a client that goes away
frees its place."""

from __future__ import annotations

import base64
import json
import socket
import time

import httpx
import pytest
from PIL import Image

from tests.serve.conftest import data_url, start_server, user
from tests.serve.test_images import _png_header

KEY = "test-key"
GOOD = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}


@pytest.fixture(scope="module")
def strict_server(tiny_dir, images_dir):
    """The tiny model with an API key, an image root, a context of 1024 tokens, 2 images per request."""
    with start_server(tiny_dir, api_key=KEY, max_model_len=1024, max_images=2, max_request_bytes=2**20,
                      images={"root": images_dir}) as server:
        yield server


def _image(url):
    return user(("image", url), "What is this?")


def _b64(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


RED = None  # filled in by the fixture below (a data URL of red.png)

# name -> (request body or raw bytes, status, the param OpenAI-style or None, words in the message)
BAD = {
    "bad base64": (lambda: {**GOOD, "messages": _image("data:image/png;base64,###")}, 400,
                   "messages[0].content[0].image_url.url", "not valid base64"),
    "not an image": (lambda: {**GOOD, "messages": _image(_b64(b"just some text"))}, 400,
                     "messages[0].content[0].image_url.url", "not an image"),
    "decompression bomb": (lambda: {**GOOD, "messages": _image(_b64(_png_header(40000, 40000)))}, 400,
                           "messages[0].content[0].image_url.url", "(a decompression bomb?)"),
    "unknown model": (lambda: {**GOOD, "model": "tiny-chat"}, 404, "model", "does not exist on this server; did you mean 'tiny'"),
    "prompt over the context": (lambda: {**GOOD, "messages": [{"role": "user", "content": "word " * 300}]}, 400,
                                "messages", "this model's context is 1024 tokens"),
    "max_tokens over the context": (lambda: {**GOOD, "max_tokens": 2000}, 400, "max_tokens", "plus max_tokens (2000)"),
    "typed <img>/etc/passwd</img>": (lambda: {**GOOD, "messages": [{"role": "user", "content": "<img>/etc/passwd</img>"}]},
                                     400, "messages[0].content", "image_url part"),
    "path outside --image-root": (lambda: {**GOOD, "messages": _image("file:///etc/passwd")}, 400,
                                  "messages[0].content[0].image_url.url", "outside the image root"),
    "path escaping --image-root": (lambda: {**GOOD, "messages": _image("../../../etc/passwd")}, 400,
                                   "messages[0].content[0].image_url.url", "outside the image root"),
    "remote image URL": (lambda: {**GOOD, "messages": _image("http://127.0.0.1:9/x.png")}, 400,
                         "messages[0].content[0].image_url.url", "remote image URLs are off"),
    "too many images": (lambda: {**GOOD, "messages": user(("i", RED), ("i", RED), ("i", RED), "three?")}, 400,
                        "messages", "at most 2"),
    "missing messages": (lambda: {"model": "tiny"}, 400, "messages", "Field required"),
    "empty messages": (lambda: {**GOOD, "messages": []}, 400, "messages", "at least 1 item"),
    "messages not a list": (lambda: {**GOOD, "messages": "hi"}, 400, "messages", "valid array"),
    "temperature a string": (lambda: {**GOOD, "temperature": "hot"}, 400, "temperature", "valid number"),
    "temperature out of range": (lambda: {**GOOD, "temperature": 3}, 400, "temperature", "less than or equal to 2"),
    "content a number": (lambda: {**GOOD, "messages": [{"role": "user", "content": 42}]}, 400,
                         "messages[0].content", "valid"),
    "text part without text": (lambda: {**GOOD, "messages": [{"role": "user", "content": [{"type": "text"}]}]}, 400,
                               "messages[0].content[0].text", "Field required"),
    "unknown part type": (lambda: {**GOOD, "messages": [{"role": "user", "content": [{"type": "video"}]}]}, 400,
                          "messages[0].content[0]", "does not match any of the expected tags"),
    "tool role": (lambda: {**GOOD, "messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role", "'user'"),
    "ends with the assistant": (lambda: {**GOOD, "messages": [{"role": "user", "content": "a"},
                                                               {"role": "assistant", "content": "b"}]}, 400,
                                "messages", "last message must be the user's"),
    "image in a system message": (lambda: {**GOOD, "messages": [{"role": "system", "content": [
        {"type": "image_url", "image_url": {"url": RED}}]}, {"role": "user", "content": "hi"}]}, 400,
        "messages[0].content[0]", "only be in user messages"),
    "n too large": (lambda: {**GOOD, "n": 64}, 400, "n", "less than or equal to 8"),
    "five stop sequences": (lambda: {**GOOD, "stop": list("abcde")}, 400, "stop", "at most 4"),
    "tools": (lambda: {**GOOD, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools",
              "not supported"),
    "logprobs": (lambda: {**GOOD, "logprobs": True}, 400, "logprobs", "not supported"),
    "not JSON": (lambda: b"{not json", 400, None, "not valid JSON"),
    "body too large": (lambda: {**GOOD, "messages": _image(_b64(b"x" * 2**20))}, 413, None, "larger than 1048576 bytes"),
}


@pytest.fixture(scope="module", autouse=True)
def _red(images_dir):
    global RED
    RED = data_url(Image.open(images_dir / "red.png"))


@pytest.mark.parametrize("name", BAD)
def test_bad_request_is_a_clear_4xx_and_the_server_goes_on(strict_server, name):
    body, status, param, words = BAD[name]
    body = body()
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    with httpx.Client(base_url=strict_server.url, headers=headers, timeout=30) as client:
        reply = client.post("/v1/chat/completions", content=content)
        assert reply.status_code == status, reply.text
        error = reply.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
        assert words in error["message"] and error["param"] == param, error
        assert "Traceback" not in reply.text
        good = client.post("/v1/chat/completions", json=GOOD)
        assert good.status_code == 200 and good.json()["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("method, path, headers, status, words", [
    ("post", "/v1/chat/completions", {}, 401, "API key"),
    ("post", "/v1/chat/completions", {"Authorization": "Bearer wrong"}, 401, "API key"),
    ("get", "/v1/models", {"Authorization": "Basic test-key"}, 401, "API key"),
    ("get", "/v1/nothing", {}, 404, "no route GET /v1/nothing"),
    ("get", "/v1/chat/completions", {}, 405, "method GET is not allowed"),
])
def test_auth_and_routes_answer_in_openai_shape(strict_server, method, path, headers, status, words):
    reply = getattr(httpx, method)(strict_server.url + path, headers=headers, timeout=30)
    assert reply.status_code == status and words in reply.json()["error"]["message"]
    assert httpx.get(strict_server.url + "/health").json()["status"] == "ok"  # no key needed


def test_file_inside_the_image_root_is_read(strict_server):
    reply = httpx.post(strict_server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                       json={**GOOD, "messages": _image("red.png")}, timeout=30)
    assert reply.status_code == 200 and reply.json()["usage"]["prompt_tokens"] > 258


def test_full_queue_is_503_then_everything_queued_is_answered(tiny_dir):
    """The engine is not started, so requests wait in the queue (2 rows) until it is."""
    import threading

    with start_server(tiny_dir, start_engine=False, max_queue=2) as server:
        results = []

        def send(body):
            results.append(httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60))

        threads = [threading.Thread(target=send, args=({**GOOD, "n": 2},))]
        threads[0].start()
        _wait(lambda: server.engine.queued == 2)
        full = httpx.post(server.url + "/v1/chat/completions", json=GOOD, timeout=30)
        assert full.status_code == 503 and full.headers["retry-after"] == "1"
        assert full.json()["error"]["code"] == "queue_full" and "--max-queue 2" in full.json()["error"]["message"]
        server.engine.start()
        threads[0].join(60)
        assert results[0].status_code == 200 and len(results[0].json()["choices"]) == 2
        assert httpx.post(server.url + "/v1/chat/completions", json=GOOD, timeout=30).status_code == 200


def _wait(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _raw_post(url: str, body: dict) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def test_a_client_that_goes_away_frees_its_place(tiny_dir):
    """Queued: the row leaves the queue. Running (streamed or not): the row leaves the batch before its
    max_tokens, and the next request is answered."""
    with start_server(tiny_dir, start_engine=False, max_queue=4) as server:
        engine = server.engine
        sock = _raw_post(server.url, GOOD)
        _wait(lambda: engine.queued == 1)
        sock.close()
        _wait(lambda: engine.queued == 0)
        assert engine.stats["cancelled"] == 1
        engine.start()
        long = {**GOOD, "max_tokens": 900, "messages": [{"role": "user", "content": "Tell me everything."}]}
        for body in (long, {**long, "stream": True}):
            cancelled = engine.stats["cancelled"]
            sock = _raw_post(server.url, body)
            _wait(lambda: engine.running == 1)
            if body.get("stream"):
                assert sock.recv(4096).startswith(b"HTTP/1.1 200")  # the answer has started streaming
            sock.close()
            _wait(lambda: engine.running == 0)
            assert engine.stats["cancelled"] == cancelled + 1
        reply = httpx.post(server.url + "/v1/chat/completions", json=GOOD, timeout=30)
        assert reply.status_code == 200
