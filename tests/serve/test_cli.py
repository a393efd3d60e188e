"""`workbench serve` itself: a real process on 127.0.0.1, and the one-line errors for a bad start."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from workbench.cli.main import main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # a fresh interpreter imports torch, transformers and peft again: 10-30 s on 2 cores
def test_serve_process_answers_and_stops_on_ctrl_c(tiny_dir, adapter_dirs, client_for):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "workbench.cli.main", "serve", "--model", str(tiny_dir),
                             "--adapter", f"llm={adapter_dirs['llm']}", "--port", str(port), "--device", "cpu",
                             "--log-level", "warning"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)

        class Server:
            pass

        server = Server()
        server.url = url
        client = client_for(server)
        assert [m.id for m in client.models.list().data] == [tiny_dir.name, "llm"]
        reply = client.chat.completions.create(model="llm", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=4, temperature=0)
        assert reply.usage.completion_tokens <= 4 and reply.choices[0].finish_reason in ("stop", "length")
        assert httpx.get(url + "/", timeout=5).text.startswith("<!doctype html>")
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"serving {tiny_dir.name}, llm on http://127.0.0.1:{port} (batching: mixed" in err


def test_cli_serves_what_its_flags_say(tiny_dir, adapter_dirs, images_dir, monkeypatch, capsys, client_for):
    """`workbench serve` in this process, uvicorn's run replaced by a background server on a free port."""
    from workbench.serve import server as server_module

    seen = {}

    def serve_forever(app, engine, host, port, log_level):
        seen.update(host=host, port=port, engine=engine)
        with server_module.BackgroundServer(app, engine) as server:
            client = client_for(server, api_key="k")
            seen["models"] = [m.id for m in client.models.list().data]
            seen["reply"] = client.chat.completions.create(
                model="base", messages=[{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": "file:red.png"}}, {"type": "text", "text": "hi"}]}],
                max_tokens=3, temperature=0)

    monkeypatch.setattr(server_module, "serve_forever", serve_forever)
    assert main(["serve", "--model", str(tiny_dir), "--name", "base", "--adapter", f"llm={adapter_dirs['llm']}",
                 "--adapter", str(adapter_dirs["all"]), "--host", "0.0.0.0", "--port", "1234", "--api-key", "k",
                 "--image-root", str(images_dir), "--max-batch", "3", "--max-queue", "5", "--device", "cpu"]) == 0
    assert seen["host"] == "0.0.0.0" and seen["port"] == 1234
    assert seen["models"] == ["base", "llm", "all"]  # a bare DIR is named after its folder
    assert seen["engine"].max_batch == 3 and seen["engine"].max_queue == 5
    assert seen["reply"].usage.prompt_tokens > 258  # the file under --image-root was read
    err = capsys.readouterr().err
    assert "serving base, llm, all on http://0.0.0.0:1234 (batching: grouped" in err
    assert "warning: serving on 0.0.0.0" not in err  # it has an API key


@pytest.mark.parametrize("extra, words", [
    (["--adapter", "=somewhere"], "expected NAME=DIR"),
    (["--adapter", "a=x", "--adapter", "a=y"], "given twice"),
    (["--adapter", "llm=/nonexistent"], "not a PEFT adapter folder"),
    (["--image-root", "/nonexistent"], "not a folder"),
])
def test_bad_start_is_a_one_line_error(tiny_dir, capsys, extra, words):
    assert main(["serve", "--model", str(tiny_dir), "--device", "cpu", *extra]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
