"""`workbench serve` against vLLM (`--engine vllm`) on the same requests, side by side.

    python -m workbench.serve.engines_bench --model DIR [--image PNG] [--requests 64]
        [--concurrency 1 8 32] [--max-tokens 32] [--dtype float32] [--vllm-arg=--enforce-eager ...] [--json PATH]

Starts each engine once through `workbench serve` on 127.0.0.1 (a free port), waits for /health,
sends one warm-up request, then for each concurrency c sends the same `--requests` greedy chat
requests from c clients at once (the official `openai` client; each client sends its share one
after the other). Prints one Markdown row per engine and concurrency: completion tokens/s,
requests/s and the median latency.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from workbench.cli.args import whole
from workbench.serve.bench import _workload, run_clients


def _serve(engine: str, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "workbench.cli.main", "serve", "--engine", engine, "--model", args.model,
           "--name", "model", "--port", str(port), "--max-images", "1",
           *(["--dtype", args.dtype] if args.dtype else []),
           *([f"--vllm-arg={a}" for a in args.vllm_arg] if engine == "vllm" else
             ["--max-batch", str(max(args.concurrency)), "--max-queue", str(args.requests), "--log-level", "warning"])]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{engine} did not start: {' '.join(cmd)}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(1)


def measure(url: str, args: argparse.Namespace, clients: int) -> dict:
    per_client = args.requests // clients
    workload = [rows[:per_client] for rows in _workload(["model"], clients, per_client, args.max_tokens, args.image)]
    began = time.perf_counter()
    replies, latencies = run_clients(url, workload, timeout_s=1800)
    seconds = time.perf_counter() - began
    tokens = sum(r.usage.completion_tokens for client in replies for r in client)
    return {"clients": clients, "requests": clients * per_client, "seconds": seconds, "tokens": tokens,
            "tokens_per_s": tokens / seconds, "requests_per_s": clients * per_client / seconds,
            "p50_s": statistics.median(latencies)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--image", help="a PNG sent with every question")
    p.add_argument("--requests", type=whole(1), default=64)
    p.add_argument("--concurrency", type=whole(1), nargs="+", default=[1, 8, 32])
    p.add_argument("--max-tokens", type=whole(1), default=32)
    p.add_argument("--dtype")
    p.add_argument("--engines", nargs="+", default=["workbench", "vllm"], choices=["workbench", "vllm"])
    p.add_argument("--vllm-arg", action="append", default=[], metavar="ARG")
    p.add_argument("--json", metavar="PATH", help="also write the rows (one dict per engine and concurrency) as JSON")
    args = p.parse_args(argv)
    print(f"model {Path(args.model).resolve().name}, {args.requests} requests, max_tokens {args.max_tokens}, "
          f"image {args.image or 'none'}, {os.cpu_count()} cores")
    print("| engine | clients | requests | seconds | completion tokens | tokens/s | requests/s | median latency s |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for engine in args.engines:
        proc, url = _serve(engine, args)
        try:
            measure(url, argparse.Namespace(**{**vars(args), "requests": 1}), 1)  # warm-up
            for clients in args.concurrency:
                r = measure(url, args, clients)
                rows.append({"engine": engine, **r})
                print(f"| {engine} | {clients} | {r['requests']} | {r['seconds']:.1f} | {r['tokens']} | "
                      f"{r['tokens_per_s']:.1f} | {r['requests_per_s']:.2f} | {r['p50_s']:.2f} |", flush=True)
        finally:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=120)
    if args.json:
        from workbench.atomic import write_json

        write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
