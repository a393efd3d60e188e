"""`workbench train CONFIG.yaml [--set key=value ...] [--resume]`."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "train", help="train an adapter from a run config",
        description="Train a LoRA/QLoRA adapter as a run config (configs/*.yaml) describes. "
                    "Run under `accelerate launch --config_file configs/accelerate/...` for DDP/FSDP/DeepSpeed.")
    parser.add_argument("config", help="run config YAML (model, dtype, adapter, data, train)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value by dotted key, value parsed as YAML "
                             "(e.g. --set train.lr=1e-4 --set data.train=[a.jsonl,b.jsonl]); repeatable")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the last checkpoint in train.output_dir")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from workbench.train.config import load_run_config
    from workbench.train.trainer import train

    config = load_run_config(args.config, args.overrides)
    result = train(config, resume=args.resume)
    return {"completed": 0, "interrupted": 130}.get(result.status, 1)
