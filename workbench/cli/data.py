"""`workbench data check FILE` and `workbench data preview FILE`: look at a data file before training."""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="check, preview or convert SFT data")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    for name, help_ in (("check", "validate every record; print counts, lengths, image sizes, first problems"),
                        ("preview", "print rendered samples with the supervised tokens marked [[...]]")):
        q = data_sub.add_parser(name, help=help_)
        q.add_argument("file", help="data file or folder (JSON, JSONL, Parquet)")
        q.add_argument("--config", help="run config YAML: its data: section (and model:) apply")
        q.add_argument("--model", help="model folder for the tokenizer (default: the config's model:)")
        q.set_defaults(run=run)
    data_sub.choices["preview"].add_argument("-n", type=int, default=2, help="how many samples")
    if importlib.util.find_spec("workbench.cli.data_convert"):
        from workbench.cli import data_convert

        data_convert.add_parsers(data_sub)


def run(args: argparse.Namespace) -> int:
    cfg, model = _config(args)
    return check(args.file, cfg, model) if args.data_command == "check" else preview(args.file, cfg, model, args.n)


def _config(args: argparse.Namespace) -> tuple[Any, str | None]:
    from workbench.data.config import DataConfig
    from workbench.errors import ConfigError
    from workbench.schema import read_yaml

    section: dict[str, Any] = {}
    model = args.model
    if args.config:
        doc = read_yaml(args.config, "config file") or {}
        if not isinstance(doc, dict):
            raise ConfigError(f"{args.config}: expected a mapping of run settings")
        section = dict(doc.get("data") or {})
        model = model or doc.get("model")
    section.update(train=[args.file], eval=[], eval_fraction=0.0)
    return DataConfig.from_dict(section, source=args.config or "<command line>"), model


def _tokenizer(model: str | None) -> Any:
    if model is None:
        return None
    from workbench.model.checkpoint import resolve_model_dir
    from workbench.model.tokenizer import QWenTokenizer

    return QWenTokenizer.from_pretrained(resolve_model_dir(model))


def check(file: str, cfg: Any, model: str | None) -> int:
    from workbench.data.dataset import build_samples
    from workbench.data.length import apply_length_policy
    from workbench.data.records import load_conversations
    from workbench.model.modeling import IGNORE_INDEX

    loaded = load_conversations(cfg.train, cfg)
    convs = loaded.conversations
    print(f"{file}: {loaded.n_rows} records, {len(convs)} valid, {len(loaded.problems)} bad")
    images = [im for c in convs for im in c.images]
    if convs:
        n_img = [len(c.images) for c in convs]
        print(f"turns per record: {_stats([len(c.turns) for c in convs])}")
        print(f"images per record: {_stats(n_img)}; {len(images)} in all, {len({im.file for im in images})} distinct")
    if images:
        print(f"image width: {_stats([im.size[0] for im in images])}")
        print(f"image height: {_stats([im.size[1] for im in images])}")
    tokenizer = _tokenizer(model)
    problems = list(loaded.problems)
    if tokenizer is None:
        print("token lengths: pass --model (or a --config with model:) to see them")
    else:
        samples = build_samples(convs, tokenizer, cfg, problems)
        if samples:
            print(f"tokens per record: {_stats([len(s) for s in samples])}")
            print(f"supervised tokens per record: {_stats([sum(v != IGNORE_INDEX for v in s.labels) for s in samples])}")
            _, report = apply_length_policy(samples, cfg.max_length, cfg.overflow)
            print(f"max_length {cfg.max_length}, overflow {cfg.overflow}: {report.summary()}")
    if problems:
        print(f"\nfirst problems ({len(problems)} in all):")
        for p in problems[:10]:
            print(f"  {p}")
    return 1 if problems else 0


def preview(file: str, cfg: Any, model: str | None, n: int) -> int:
    from workbench.data.dataset import bad_records_error, build_samples
    from workbench.data.records import load_conversations
    from workbench.errors import ConfigError
    from workbench.model.modeling import IGNORE_INDEX

    tokenizer = _tokenizer(model)
    if tokenizer is None:
        raise ConfigError("data preview needs a tokenizer: pass --model DIR (or a --config with model:)")
    loaded = load_conversations(cfg.train, cfg)
    if not loaded.conversations and loaded.problems:
        raise bad_records_error(loaded.problems)
    color = sys.stdout.isatty()
    open_, close = ("\033[1;32m", "\033[0m") if color else ("[[", "]]")
    for s in build_samples(loaded.conversations[:n], tokenizer, cfg, loaded.problems):
        print(f"--- {s.file} record {s.record}: {len(s)} tokens, "
              f"{sum(v != IGNORE_INDEX for v in s.labels)} supervised, {len(s.images)} images ---")
        # Decode runs of equally supervised tokens, so an image span decodes back to <img>path</img>.
        out, start = [], 0
        for i in range(1, len(s) + 1):
            if i == len(s) or (s.labels[i] == IGNORE_INDEX) != (s.labels[start] == IGNORE_INDEX):
                text = tokenizer.decode(s.input_ids[start:i])
                out.append(text if s.labels[start] == IGNORE_INDEX else f"{open_}{text}{close}")
                start = i
        print("".join(out))
    return 0


def _stats(values: list[int]) -> str:
    return (f"min {min(values)}, median {statistics.median(values):g}, mean {statistics.fmean(values):.1f}, "
            f"max {max(values)}")
