"""Throughput of `workbench serve`, batched vs one by one, measured with the official `openai` client.

    python -m workbench.serve.bench --model DIR [--adapter NAME=DIR ...] [--clients 32] [--requests 4]
        [--max-tokens 32] [--max-batch 8] [--image PNG] [--threads N] [--device cpu]

Starts `workbench serve` twice on 127.0.0.1 (a free port), in its own process: with `--max-batch`
and with `--max-batch 1`. Each time `--clients` threads each send `--requests` greedy requests one after the
other, cycling through the base and the adapters; the answers of both runs are compared (they
must be equal). Prints one Markdown table row per run.
"""

from __future__ import annotations

import argparse
import base64
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

from workbench.cli.args import whole


def run_clients(url: str, workload: list[list[dict]], timeout_s: float = 300.0, api_key: str = "unused"
                ) -> tuple[list[list], list[float]]:
    """Each inner list is one client's requests (create() kwargs), sent in order; all clients at once.
    Returns the replies (per client, in order) and every request's latency in seconds."""
    from openai import OpenAI

    latencies: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(len(workload))

    def client(requests: list[dict]) -> list:
        api = OpenAI(base_url=url + "/v1", api_key=api_key, timeout=timeout_s, max_retries=0)
        start.wait()
        replies = []
        for kwargs in requests:
            began = time.perf_counter()
            replies.append(api.chat.completions.create(**kwargs))
            with lock:
                latencies.append(time.perf_counter() - began)
        return replies

    with ThreadPoolExecutor(len(workload)) as pool:
        futures = [pool.submit(client, requests) for requests in workload]
        done, late = wait(futures, timeout=timeout_s)
        if late:
            raise TimeoutError(f"{len(late)} of {len(futures)} clients did not finish within {timeout_s} s")
        return [f.result() for f in futures], latencies


def _workload(models: list[str], clients: int, requests: int, max_tokens: int, image: str | None) -> list[list[dict]]:
    content: list[dict] = []
    if image:
        url = "data:image/png;base64," + base64.b64encode(Path(image).read_bytes()).decode()
        content.append({"type": "image_url", "image_url": {"url": url}})
    out = []
    for c in range(clients):
        rows = []
        for r in range(requests):
            question = {"type": "text", "text": f"Question {r} of client {c}: what is in the picture?"}
            rows.append({"model": models[(c + r) % len(models)], "temperature": 0, "max_tokens": max_tokens,
                         "messages": [{"role": "user", "content": [*content, question]}]})
        out.append(rows)
    return out


def measure(serve_args: list[str], max_batch: int, workload: list[list[dict]], threads: int | None
            ) -> tuple[dict, list[str]]:
    """One run against `workbench serve` in its own process, so the clients' threads here do not
    share the server's interpreter (and its GIL)."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    cmd = [sys.executable, "-m", "workbench.cli.main", "serve", *serve_args, "--port", str(port),
           "--max-batch", str(max_batch), "--max-queue", str(sum(map(len, workload))), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start: {' '.join(cmd)}")
            try:
                httpx.get(url + "/health", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        began = time.perf_counter()
        replies, latencies = run_clients(url, workload)
        seconds = time.perf_counter() - began
        stats = httpx.get(url + "/health", timeout=10).json()["stats"]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    flat = [r for client in replies for r in client]
    tokens = sum(r.usage.completion_tokens for r in flat)
    result = {"max_batch": max_batch, "requests": len(flat), "seconds": seconds, "tokens_per_s": tokens / seconds,
              "requests_per_s": len(flat) / seconds, "p50_s": statistics.median(latencies),
              "largest_batch": stats["max_rows"], "tokens": tokens}
    return result, [r.choices[0].message.content for r in flat]


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR")
    p.add_argument("--clients", type=whole(1), default=32)
    p.add_argument("--requests", type=whole(1), default=4)
    p.add_argument("--max-tokens", type=whole(1), default=32)
    p.add_argument("--max-batch", type=whole(1), default=8)
    p.add_argument("--image", help="a PNG sent with every question")
    p.add_argument("--threads", type=whole(1), help="the server's torch CPU threads (OMP_NUM_THREADS; default: torch's)")
    p.add_argument("--dtype")
    p.add_argument("--device")
    args = p.parse_args(argv)
    names = [Path(args.model).resolve().name if Path(args.model).is_dir() else args.model]
    names += [spec.partition("=")[0] if "=" in spec else Path(spec).name for spec in args.adapter]
    serve_args = ["--model", args.model, *[a for spec in args.adapter for a in ("--adapter", spec)]]
    serve_args += [a for flag in ("dtype", "device") if getattr(args, flag) for a in (f"--{flag}", getattr(args, flag))]
    workload = _workload(names, args.clients, args.requests, args.max_tokens, args.image)
    print(f"{len(names)} models, {args.clients} clients x {args.requests} requests, max_tokens {args.max_tokens}, "
          f"image {args.image or 'none'}, device {args.device or 'default'}, {platform.processor() or 'cpu'} "
          f"({os.cpu_count()} cores), server threads {args.threads or 'default'}, torch {torch.__version__}")
    print("| max batch | requests | seconds | completion tokens/s | requests/s | median latency s | largest batch |")
    print("|---|---|---|---|---|---|---|")
    answers = []
    for max_batch in (args.max_batch, 1):
        result, texts = measure(serve_args, max_batch, workload, args.threads)
        answers.append(texts)
        print(f"| {max_batch} | {result['requests']} | {result['seconds']:.1f} | {result['tokens_per_s']:.1f} | "
              f"{result['requests_per_s']:.2f} | {result['p50_s']:.2f} | {result['largest_batch']} |", flush=True)
    same = sum(a == b for a, b in zip(*answers))
    print(f"greedy answers equal in both runs: {same} of {len(answers[0])}")
    return 0 if same == len(answers[0]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
