"""`workbench data check FILE` and `workbench data preview FILE`: look at a data file before training."""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from array import array
from collections import Counter
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from workbench.cli.args import number, whole


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
    preview_parser = data_sub.choices["preview"]
    preview_parser.add_argument("-n", type=whole(1), default=2, help="how many samples")
    preview_parser.add_argument("--draw", metavar="DIR",
                                help="also write each sample's images as the model sees them, with its boxes "
                                     "and refs drawn (read back from the tokens), as PNGs into DIR")
    q = data_sub.add_parser("pairs", help="preference pairs for method: dpo from a model's own grounding answers "
                                          "(best vs worst IoU of N samples)")
    q.add_argument("--model", required=True, help="base model folder")
    q.add_argument("--adapter", help="adapter folder (an SFT run) on the base; default: the base alone")
    q.add_argument("--data", required=True, help="grounding data (any format; every <ref> answered with a box)")
    q.add_argument("--out", required=True, help="the pairs file to write (JSONL), in a folder above the images")
    q.add_argument("--samples", type=whole(2), default=8, help="answers sampled per question (default 8)")
    q.add_argument("--temperature", type=number(gt=0), default=1.0)
    q.add_argument("--top-p", type=number(gt=0, le=1), default=1.0)
    q.add_argument("--max-new-tokens", type=whole(1), default=64)
    q.add_argument("--batch-size", type=whole(1), default=8, help="questions per generate call")
    q.add_argument("--image-root", help="the data's image root (the pairs file then names images as the data does)")
    q.add_argument("--seed", type=whole(0), default=0)
    q.add_argument("--limit", type=whole(1), help="the first N questions only")
    q.set_defaults(run=run_pairs)
    if importlib.util.find_spec("workbench.cli.data_convert"):
        from workbench.cli import data_convert

        data_convert.add_parsers(data_sub)


def run(args: argparse.Namespace) -> int:
    cfg, model = _config(args)
    if args.data_command == "check":
        return check(args.file, cfg, model)
    return preview(args.file, cfg, model, args.n, args.draw)


def run_pairs(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from workbench.api import load_model, load_tokenizer
    from workbench.errors import WorkbenchError
    from workbench.eval.grounding import load_queries
    from workbench.train.pairs import mine_pairs

    if args.adapter and not (Path(args.adapter) / "adapter_config.json").is_file():
        raise WorkbenchError(f"--adapter: {args.adapter} holds no adapter_config.json (a PEFT adapter or SFT run folder)")
    queries = load_queries(args.data, args.image_root)[:args.limit]
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(args.model, dtype=torch.bfloat16 if device == "cuda" else torch.float32, device=device)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
    model.eval()
    source = {"model": args.model, "adapter": args.adapter, "samples": args.samples,
              "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed}
    report = mine_pairs(model, load_tokenizer(args.model), queries, Path(args.out), source=source,
                        samples=args.samples, temperature=args.temperature, top_p=args.top_p,
                        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, image_root=args.image_root)
    print(report.summary(Path(args.out)))
    print(f"  from model {args.model}, adapter {args.adapter or '(none: the base)'}; train on it with method: dpo")
    return 0


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
    # `data check` decodes every image: a truncated file passes a header check
    section.update(train=[args.file], eval=[], eval_fraction=0.0, check_images="decode")
    return DataConfig.from_dict(section, source=args.config or "<command line>"), model


def _tokenizer(model: str | None) -> Any:
    if model is None:
        return None
    from workbench.model.checkpoint import resolve_model_dir
    from workbench.model.tokenizer import QWenTokenizer

    return QWenTokenizer.from_pretrained(resolve_model_dir(model))


def check_pairs(file: str, cfg: Any, model: str | None) -> int:
    """A preference file (records with chosen/rejected, for method: dpo): every pair's checks; with a
    tokenizer also the lengths (a prompt that leaves no room within max_length, answers cut)."""
    from workbench.data.preference import PreferenceReport, load_pairs, parse_pair
    from workbench.data.records import find_files, iter_lines
    from workbench.errors import DataError

    tokenizer = _tokenizer(model)
    report = PreferenceReport()
    if tokenizer is not None:
        load_pairs(cfg.train, cfg, tokenizer, report)
    else:
        headers: dict = {}
        for path in find_files(cfg.train):
            for index, line, row in iter_lines(path):
                report.rows += 1
                try:
                    if isinstance(row, DataError):
                        raise row
                    parse_pair(row, str(path), index, line, cfg, headers)
                    report.pairs += 1
                except DataError as err:
                    report.problems.append(err)
    print(f"{file}: preference pairs (method: dpo)")
    print(report.summary())
    if tokenizer is None:
        print("token lengths: pass --model (or a --config with model:) to check them against max_length")
    if report.problems:
        print(f"\nfirst problems ({len(report.problems)} bad records in all):")
        for problem in report.problems[:10]:
            print(f"  {problem}")
        raise DataError(f"{len(report.problems)} bad record{'s' * (len(report.problems) > 1)} of {report.rows}; "
                        f"the first: {report.problems[0]}")
    return 0


def check(file: str, cfg: Any, model: str | None) -> int:
    """Validate every record, streaming: statistics accumulate as compact arrays, records are not kept."""
    from workbench.data.preference import is_preference_file

    if is_preference_file(cfg.train):
        return check_pairs(file, cfg, model)
    from workbench.data.dataset import build_samples
    from workbench.data.length import fit
    from workbench.data.records import iter_conversations
    from workbench.errors import DataError
    from workbench.model.modeling import IGNORE_INDEX

    tokenizer = _tokenizer(model)
    stats = {key: array("l") for key in ("turns", "images", "width", "height", "tokens", "supervised")}
    n_rows, n_bad, first_problems = 0, 0, []
    length = Counter()
    images_seen: set[str] = set()
    headers: dict = {}  # one header read per distinct image (sizes only, small)
    for item in tqdm(iter_conversations(cfg.train, cfg, headers), desc="checking", unit=" records",
                     file=sys.stderr, mininterval=2, disable=None):  # no bar when not a terminal
        n_rows += 1
        problems: list[DataError] = [item] if isinstance(item, DataError) else []
        if not problems:
            stats["turns"].append(len(item.turns))
            stats["images"].append(len(item.images))
            for image in item.images:
                if str(image.file) not in images_seen:
                    images_seen.add(str(image.file))
                stats["width"].append(image.size[0])
                stats["height"].append(image.size[1])
            if tokenizer is not None:
                for sample in build_samples([item], tokenizer, cfg, problems):
                    stats["tokens"].append(len(sample))
                    stats["supervised"].append(sum(v != IGNORE_INDEX for v in sample.labels))
                    out = fit(sample, cfg.max_length, cfg.overflow)
                    length[out if isinstance(out, str) else "cut at a turn boundary" if len(out) < len(sample)
                           else "kept"] += 1
        n_bad += bool(problems)
        first_problems += problems[:max(0, 10 - len(first_problems))]
    print(f"{file}: {n_rows} records, {n_rows - n_bad} valid, {n_bad} bad")
    if stats["turns"]:
        print(f"turns per record: {_stats(stats['turns'])}")
        print(f"images per record: {_stats(stats['images'])}; {len(stats['width'])} in all, "
              f"{len(images_seen)} distinct")
    if stats["width"]:
        print(f"image width: {_stats(stats['width'])}")
        print(f"image height: {_stats(stats['height'])}")
    if tokenizer is None:
        print("token lengths: pass --model (or a --config with model:) to see them")
    elif stats["tokens"]:
        print(f"tokens per record: {_stats(stats['tokens'])}")
        print(f"supervised tokens per record: {_stats(stats['supervised'])}")
        print(f"max_length {cfg.max_length}, overflow {cfg.overflow}: "
              + ", ".join(f"{n} {why}" for why, n in sorted(length.items())))
    if first_problems:
        print(f"\nfirst problems ({n_bad} bad records in all):")
        for p in first_problems:
            print(f"  {p}")
        raise DataError(f"{n_bad} bad record{'s' * (n_bad > 1)} of {n_rows}; the first: {first_problems[0]}")
    return 0


def preview(file: str, cfg: Any, model: str | None, n: int, draw: str | None = None) -> int:
    from pathlib import Path

    from workbench.data.dataset import bad_records_error, build_samples
    from workbench.data.draw import draw_sample
    from workbench.data.records import load_conversations
    from workbench.errors import ConfigError
    from workbench.model.checkpoint import resolve_model_dir
    from workbench.model.config import load_config
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
        if draw:
            image_size = load_config(resolve_model_dir(model)).visual["image_size"]
            for png in draw_sample(s, tokenizer, image_size, Path(draw)):
                print(f"drawn: {png}")
    return 0


def _stats(values: Sequence[int]) -> str:
    return (f"min {min(values)}, median {statistics.median(values):g}, mean {statistics.fmean(values):.1f}, "
            f"max {max(values)}")
