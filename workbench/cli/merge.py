"""`workbench merge`: fold a LoRA adapter into the base weights and write a release-layout folder."""

from __future__ import annotations

import argparse

from workbench.dtypes import DTYPE_NAMES


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge", help="merge a LoRA/QLoRA adapter into the base model (streaming, shard by shard)",
        description="Writes OUT with the release's key names, sharding and non-weight files, plus "
                    "merge_report.json. With --dtype, config.json's torch_dtype (and a forced "
                    "bf16/fp16/fp32 flag) follow the new dtype.")
    p.add_argument("--base", required=True, help="base model folder or hub repo id")
    p.add_argument("--adapter", required=True, help="PEFT adapter folder (workbench train or finetune.py)")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                   help="output dtype (default: keep each base tensor's dtype)")
    p.add_argument("--max-shard-size", default="2GB", help="largest output shard, e.g. 2GB, 500MB")
    p.add_argument("--verify", action="store_true",
                   help="compare merged vs base+adapter logits on a probe batch with an image")
    p.add_argument("--device", default="cpu", help="device for --verify (cpu, cuda)")
    p.add_argument("--force", action="store_true", help="merge although the adapter's recorded base differs")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from workbench.dtypes import TORCH_DTYPES
    from workbench.merge.merge import merge_adapter

    report = merge_adapter(args.base, args.adapter, args.out, dtype=TORCH_DTYPES.get(args.dtype),
                   max_shard_size=args.max_shard_size, force=args.force, overwrite=args.overwrite,
                   verify=args.verify, device=args.device)
    print(f"merged {len(report['merged_modules'])} LoRA modules and "
          f"{len(report['trained_params_written'])} trained tensors into {args.out}")
    for note in report["notes"]:
        print(f"note: {note}")
    if "verify" in report:
        v = report["verify"]
        print(f"verify: max |logit diff| {v['max_abs_logit_diff']:.3g} <= tolerance {v['tolerance']:.3g} "
              f"({v['dtype']})")
    return 0
