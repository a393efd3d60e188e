"""`workbench eval grounding`: RefCOCO-style grounding accuracy of a model (+ adapter)."""

from __future__ import annotations

import argparse
from pathlib import Path

from workbench.cli.args import whole
from workbench.dtypes import DTYPE_NAMES


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model (+ adapter)")
    tasks = p.add_subparsers(dest="task", required=True)
    g = tasks.add_parser(
        "grounding", help="Acc@0.5 / mean IoU on grounding data; writes report.json and PNGs",
        description="Reads a structured JSONL (objects with ref + bbox) or the official Qwen-VL RefCOCO "
                    "eval JSONL (image, sent, bbox, height, width). Published numbers: --prompt official "
                    "--parser official --divisor 999 --batch-size 8.")
    g.add_argument("--model", required=True, help="base model folder or hub repo id")
    g.add_argument("--adapter", help="PEFT adapter folder")
    g.add_argument("--data", required=True, help="structured .jsonl/.json or official eval .jsonl")
    g.add_argument("--image-root", help="image paths are relative to this (default: the data file's folder, then cwd)")
    g.add_argument("--prompt", default="official",
                   help="'official' (<img>..</img><ref>..</ref><box>, no ChatML), 'chat' (ChatML with the "
                        "grounding template), or a ChatML prompt with <ref-object> (default: official)")
    g.add_argument("--batch-size", type=whole(1), default=8)
    g.add_argument("--max-new-tokens", type=whole(1), default=None,
                   help="default: 28 for --prompt official (the official protocol), 128 for chat prompts")
    g.add_argument("--parser", choices=["robust", "official"], default="robust",
                   help="robust: any box format, prefers the box labelled with the query; official: first (a,b),(c,d)")
    g.add_argument("--divisor", type=int, choices=[1000, 999], default=1000,
                   help="grid -> pixels: 1000 (training data, draw_bbox) or 999 (the official RefCOCO script)")
    g.add_argument("--limit", type=whole(1), help="evaluate only the first N queries")
    g.add_argument("--images", type=whole(0), default=16, help="PNGs drawn for the first N queries")
    g.add_argument("--out", default="eval_grounding", help="output folder (report.json, samples/*.png)")
    g.add_argument("--overwrite", action="store_true", help="clear an output folder that holds an earlier report")
    g.add_argument("--allow-outside-root", action="store_true",
                   help="allow image paths that lead outside the image root (like data.allow_outside_root)")
    g.add_argument("--dtype", choices=DTYPE_NAMES, help="default: the config's")
    g.add_argument("--device", help="default: cuda if available, else cpu")
    g.set_defaults(run=run_grounding)


def run_grounding(args: argparse.Namespace) -> int:
    from workbench.eval.chat import load_for_inference
    from workbench.eval.grounding import evaluate_grounding, load_queries, prepare_out_dir
    from workbench.model.digests import sha256_file

    out = prepare_out_dir(args.out, args.overwrite)  # before anything slow
    queries = load_queries(args.data, args.image_root, args.allow_outside_root)[:args.limit]
    model, tokenizer = load_for_inference(args.model, args.adapter, args.dtype, args.device)
    about = {"model": args.model, "adapter": args.adapter, "data": args.data,
             "data_sha256": sha256_file(Path(args.data)), "queries": len(queries)}
    report = evaluate_grounding(model, tokenizer, queries, prompt=args.prompt, batch_size=args.batch_size,
                                max_new_tokens=args.max_new_tokens, parser=args.parser, divisor=args.divisor,
                                out_dir=out, n_images=args.images, about=about)
    m = report["metrics"]
    print(f"{m['n']} queries: Acc@0.5 {m['acc@0.5']:.4f}, mean IoU {m['mean_iou']:.4f}, "
          f"unparseable answers {m['parse_failures']} ({m['parse_failure_rate']:.1%}"
          + "".join(f", {k} {v}" for k, v in m["parse_failure_kinds"].items()) + f"), wrong boxes {m['wrong_boxes']}")
    for key in ("per_split", "per_category"):
        for name, s in m[key].items():
            print(f"  {key[4:]} {name}: Acc@0.5 {s['acc@0.5']:.4f} over {s['n']}")
    print(f"report: {out / 'report.json'}")
    return 0
