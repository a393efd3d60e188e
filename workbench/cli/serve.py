"""`workbench serve`: an OpenAI-compatible server for a model and its adapters, with a playground at /."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from workbench.cli.args import number, whole
from workbench.dtypes import DTYPE_NAMES


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model (+ adapters) over OpenAI's chat-completions API",
                       description="POST /v1/chat/completions (text and image_url parts, streaming, boxes per "
                                   "choice), GET /v1/models, GET /health, and a grounding playground at /. "
                                   "Requests that arrive together are batched.")
    p.add_argument("--model", required=True, help="model folder or hub repo id (a merged model or a base)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="a PEFT adapter on the base, requested as model=NAME (repeatable)")
    p.add_argument("--name", help="the base model's name in requests (default: the folder's name or the hub id)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=whole(0, 65535), default=8000)
    p.add_argument("--api-key", default=os.environ.get("WORKBENCH_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $WORKBENCH_API_KEY, else none)")
    p.add_argument("--image-root", help="allow file: image URLs and paths, only inside this folder")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="fetch http(s) image URLs (the server then reaches whatever its network reaches)")
    p.add_argument("--max-batch", type=whole(1), default=8, help="rows (choices) decoded together (default 8)")
    p.add_argument("--max-queue", type=whole(1), default=64, help="rows waiting before requests get 503 (default 64)")
    p.add_argument("--batch-wait-ms", type=number(ge=0), default=10.0,
                   help="how long an idle server waits for requests arriving together (default 10)")
    p.add_argument("--max-model-len", type=whole(1), help="prompt + answer tokens (default: the tokenizer's model_max_length)")
    p.add_argument("--max-images", type=whole(1), default=8, help="images per request (default 8)")
    p.add_argument("--max-image-bytes", type=whole(1), help="encoded size of one image (default 20 MiB)")
    p.add_argument("--max-image-pixels", type=whole(1), help="width x height of one image (default 8192 x 8192)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="default: the config's")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--engine", choices=["workbench", "vllm"], default="workbench",
                   help="vllm: vLLM's OpenAI server from .venv-vllm (`make vllm`) with the workbench's Qwen-VL "
                        "plugin; --model, --adapter (LLM-only LoRA), --name, --host, --port, --api-key, --dtype, "
                        "--max-model-len (default: the config's seq_length) and --max-images apply")
    p.add_argument("--vllm-arg", action="append", default=[], metavar="ARG",
                   help="with --engine vllm: one more argument for vLLM's server, e.g. --vllm-arg=--tensor-parallel-size "
                        "--vllm-arg=2 (repeatable)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.engine == "vllm":
        from workbench.serve.vllm_launch import launch

        return launch(args)
    from dataclasses import replace
    from pathlib import Path

    from workbench.errors import WorkbenchError
    from workbench.serve.app import Settings, create_app
    from workbench.serve.engine import Engine
    from workbench.serve.images import ImageLimits
    from workbench.serve.models import ServedModel, parse_adapter_specs
    from workbench.serve.server import serve_forever

    root = Path(args.image_root) if args.image_root else None
    if root is not None and not root.is_dir():
        raise WorkbenchError(f"--image-root {root}: not a folder")
    served = ServedModel.load(args.model, parse_adapter_specs(args.adapter), dtype=args.dtype, device=args.device,
                              name=args.name)
    engine = Engine(served, max_batch=args.max_batch, max_queue=args.max_queue, batch_wait_s=args.batch_wait_ms / 1000)
    images = replace(ImageLimits(root=root, allow_remote=args.allow_remote_images),
                     **{k: v for k, v in (("max_bytes", args.max_image_bytes), ("max_pixels", args.max_image_pixels))
                        if v is not None})
    settings = Settings(images, args.api_key, max_images=args.max_images, max_model_len=args.max_model_len)
    if not _loopback(args.host) and not args.api_key:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    print(f"serving {', '.join(served.names)} on http://{args.host}:{args.port} (batching: {served.mode}; "
          f"playground at /)", file=sys.stderr)
    serve_forever(create_app(served, engine, settings), engine, args.host, args.port, args.log_level)
    return 0


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
