"""`workbench` command line: one module per command in this package.

Each command module defines `add_parser(subparsers)` and `run(args) -> int | None`, and imports
heavy libraries (torch, transformers) inside `run`, so `workbench --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from workbench.errors import WorkbenchError

# bitsandbytes warns at import, on CPUs with AVX512-BF16, that an optional CPU 4-bit kernel
# package is missing. The workbench never uses that kernel (adapters/quantize.py turns the CPU
# repack path off), so the warning would only alarm people.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

COMMANDS = ["train", "merge", "inspect", "data", "eval", "chat", "serve", "bench", "vit", "demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workbench", description="Fine-tune Qwen-VL-Chat with LoRA/QLoRA.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"workbench.cli.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"workbench.cli.{name}":
                continue  # command not built yet
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except WorkbenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
