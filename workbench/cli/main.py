"""`workbench` command line: one module per command in this package.

Each command module defines `add_parser(subparsers)` and `run(args) -> int | None`, and imports
heavy libraries (torch, transformers) inside `run`, so `workbench --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from workbench.errors import WorkbenchError, describe

# bitsandbytes warns at import, on CPUs with AVX512-BF16, that an optional CPU 4-bit kernel
# package is missing. The workbench never uses that kernel (adapters/quantize.py turns the CPU
# repack path off), so the warning would only alarm people.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

COMMANDS = ["train", "merge", "quantize", "inspect", "data", "eval", "chat", "serve", "bench", "vit", "demo", "schema"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workbench", description="Fine-tune Qwen-VL-Chat with LoRA/QLoRA.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
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
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a dependency's error: one line, the traceback only with --debug
        if args.debug:
            raise
        line, users = describe(err)
        print(f"error: {line} (workbench --debug ... shows the traceback)", file=sys.stderr)
        return 2 if users else 1


if __name__ == "__main__":
    sys.exit(main())
