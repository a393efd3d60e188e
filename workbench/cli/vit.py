"""`workbench vit import-openclip`: an OpenCLIP ViT trunk in Qwen-VL's layout (paper's stage-1 init)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    vit = sub.add_parser("vit", help="vision-tower tools").add_subparsers(dest="vit_command", required=True)
    p = vit.add_parser("import-openclip", help="convert an OpenCLIP visual trunk into a Qwen-VL model folder")
    p.add_argument("--model", default="ViT-bigG-14", help="OpenCLIP registry name (default: ViT-bigG-14)")
    p.add_argument("--weights", required=True, help="local OpenCLIP checkpoint file (no download)")
    p.add_argument("--base", required=True, help="Qwen-VL folder or hub id: config, tokenizer, other weights")
    p.add_argument("--out", required=True, help="new model folder to write")
    p.add_argument("--resampler", choices=["base", "fresh"], default="base",
                   help="attn_pool, ln_post and proj from the base weights or freshly initialised")
    p.add_argument("--llm", choices=["base", "fresh"], default="base", help="the LLM from the base or fresh")
    p.add_argument("--max-shard-size", default="2GB")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from workbench.convert.openclip import import_openclip, load_openclip_visual

    visual = load_openclip_visual(args.model, args.weights)
    out = import_openclip(visual, args.base, args.out, resampler=args.resampler, llm=args.llm,
                          max_shard_size=args.max_shard_size)
    print(f"wrote {out} (ViT trunk from {args.weights}, resampler: {args.resampler}, LLM: {args.llm})")
    return 0
